{{/*
Names and labels. Every object's name starts with pgcg.fullname; object metadata
carries pgcg.labels; pod templates carry only pgcg.podLabels (the selector labels
and the workload's podLabels), so that a chart or version bump changes no pod
template and restarts nothing. Label sets are dicts merged once and printed with
toYaml: no key can appear twice.
*/}}

{{- define "pgcg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pgcg.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pgcg.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pgcg.namespace" -}}
{{- .Release.Namespace }}
{{- end }}

{{/*
Selector labels as a dict. Call with (dict "root" $) for the whole release, plus
"component" and, for a consumer group, "group".
*/}}
{{- define "pgcg.selectorDict" -}}
{{- $labels := dict "app.kubernetes.io/name" (include "pgcg.name" .root) "app.kubernetes.io/instance" .root.Release.Name }}
{{- with .component }}
{{- $_ := set $labels "app.kubernetes.io/component" . }}
{{- end }}
{{- with .group }}
{{- $_ := set $labels "pgcg/group" (include "pgcg.groupLabel" .) }}
{{- end }}
{{- toYaml $labels }}
{{- end }}

{{- define "pgcg.selectorLabels" -}}
{{- include "pgcg.selectorDict" . }}
{{- end }}

{{/*
Labels of an object's metadata. Call with (dict "root" $), plus "component",
"group" and "image" (the image the object's pods run: its tag is the version
label, so a group with its own image carries its own version).
*/}}
{{- define "pgcg.labels" -}}
{{- $root := .root }}
{{- $image := .image | default $root.Values.image }}
{{- $version := ternary ($image.digest | default "" | trimPrefix "sha256:" | trunc 12) ($image.tag | default $root.Chart.AppVersion | toString) (and (empty $image.tag) (not (empty $image.digest))) }}
{{- $labels := include "pgcg.selectorDict" . | fromYaml }}
{{- $_ := set $labels "helm.sh/chart" (include "pgcg.chart" $root) }}
{{- $_ := set $labels "app.kubernetes.io/version" ($version | replace "+" "_" | trunc 63 | trimSuffix "-" | trimSuffix "." | trimSuffix "_") }}
{{- $_ := set $labels "app.kubernetes.io/managed-by" $root.Release.Service }}
{{- $_ := set $labels "app.kubernetes.io/part-of" "pgcg" }}
{{- toYaml (merge $labels (deepCopy ($root.Values.commonLabels | default dict))) }}
{{- end }}

{{/*
Labels of a pod template: the selector labels and the workload's podLabels,
nothing that changes with the chart's version. Call like pgcg.selectorDict, plus
"podLabels".
*/}}
{{- define "pgcg.podLabels" -}}
{{- $labels := include "pgcg.selectorDict" . | fromYaml }}
{{- toYaml (merge $labels (deepCopy (.podLabels | default dict))) }}
{{- end }}

{{/*
A group name as a label value. Group names may end in "-", "." or "_", which
label values may not; those are trimmed (collisions are caught in pgcg.validate).
*/}}
{{- define "pgcg.groupLabel" -}}
{{- regexReplaceAll "[-._]+$" . "" }}
{{- end }}

{{/*
A group name as part of an object name (DNS-1123: lower case, digits, "-").
*/}}
{{- define "pgcg.groupSlug" -}}
{{- regexReplaceAll "-+$" (regexReplaceAll "[^a-z0-9-]+" (lower .) "-") "" }}
{{- end }}

{{- define "pgcg.coordinator.fullname" -}}
{{- printf "%s-coordinator" (include "pgcg.fullname" .) }}
{{- end }}

{{/* Call with (dict "root" $ "group" $name). */}}
{{- define "pgcg.consumer.fullname" -}}
{{- printf "%s-consumer-%s" (include "pgcg.fullname" .root) (include "pgcg.groupSlug" .group) }}
{{- end }}

{{- define "pgcg.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pgcg.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret and key holding the DSN. */}}
{{- define "pgcg.databaseSecretName" -}}
{{- if .Values.database.existingSecret }}
{{- .Values.database.existingSecret }}
{{- else }}
{{- printf "%s-database" (include "pgcg.fullname" .) }}
{{- end }}
{{- end }}

{{- define "pgcg.databaseSecretKey" -}}
{{- if .Values.database.existingSecret }}
{{- .Values.database.existingSecretKey }}
{{- else -}}
database-url
{{- end }}
{{- end }}

{{/* Image reference from an image dict: repository, then @digest or :tag. */}}
{{- define "pgcg.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion | toString) }}
{{- end }}
{{- end }}

{{/*
A number for an environment variable. Helm reads YAML numbers as float64, which
print as 1e+06; whole numbers are printed as integers instead. A number given
as a string (`--set x=12.5` arrives as "12.5") is printed as given.
*/}}
{{- define "pgcg.number" -}}
{{- if kindIs "string" . }}
{{- trim . }}
{{- else if kindIs "bool" . }}
{{- . }}
{{- else if eq (float64 .) (floor .) }}
{{- int64 . }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/*
Merge `src` into `dst` in place, key by key: maps are merged recursively, any
other value (false and 0 included) replaces the one in dst, and null removes the
key. Lists replace lists. Call with (dict "dst" $map "src" $overrides).
*/}}
{{- define "pgcg.mergeInto" -}}
{{- $dst := .dst }}
{{- range $k, $v := (.src | default dict) }}
{{- if kindIs "invalid" $v }}
{{- $_ := unset $dst $k }}
{{- else if and (kindIs "map" $v) (kindIs "map" (get $dst $k)) }}
{{- include "pgcg.mergeInto" (dict "dst" (get $dst $k) "src" $v) }}
{{- else }}
{{- $_ := set $dst $k (deepCopy $v) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A group's effective configuration: `consumer` defaults with the group's keys
merged in key by key (pgcg.mergeInto), image merged over the top-level image,
keda over the top-level keda, and settings over the top-level settings (then
`consumer.settings`, then the group's own). Returns YAML; callers use fromYaml.
Call with (dict "root" $ "name" $name "group" $group).
*/}}
{{- define "pgcg.groupConfig" -}}
{{- $root := .root }}
{{- $c := deepCopy $root.Values.consumer }}
{{- $group := deepCopy (.group | default dict) }}
{{- $groupSettings := $group.settings | default dict }}
{{- $groupImage := $group.image | default dict }}
{{- $groupKeda := $group.keda | default dict }}
{{- $_ := unset $group "settings" }}
{{- $_ := unset $group "image" }}
{{- $_ := unset $group "keda" }}
{{- include "pgcg.mergeInto" (dict "dst" $c "src" $group) }}
{{- $image := deepCopy $root.Values.image }}
{{- include "pgcg.mergeInto" (dict "dst" $image "src" ($root.Values.consumer.image | default dict)) }}
{{- include "pgcg.mergeInto" (dict "dst" $image "src" $groupImage) }}
{{- $_ := set $c "image" $image }}
{{- $settings := deepCopy $root.Values.settings }}
{{- include "pgcg.mergeInto" (dict "dst" $settings "src" ($root.Values.consumer.settings | default dict)) }}
{{- include "pgcg.mergeInto" (dict "dst" $settings "src" $groupSettings) }}
{{- $_ := set $c "settings" $settings }}
{{- $keda := deepCopy $root.Values.keda }}
{{- include "pgcg.mergeInto" (dict "dst" $keda "src" $groupKeda) }}
{{- if not $keda.maxReplicaCount }}
{{- $max := 16 }}
{{- range $root.Values.topics }}
{{- if eq .name $c.topic }}
{{- $max = .partitions | default 16 }}
{{- end }}
{{- end }}
{{- $_ := set $keda "maxReplicaCount" $max }}
{{- end }}
{{- $_ := set $c "keda" $keda }}
{{- $_ := set $c "name" .name }}
{{- toYaml $c }}
{{- end }}

{{/*
Settings with pgcg's own default for every key left out (or null), as the
processes will see them. Call with the settings map; returns YAML.
*/}}
{{- define "pgcg.effectiveSettings" -}}
{{- $spec := include "pgcg.settingsSpec" . | fromYaml }}
{{- $out := dict }}
{{- range $key, $entry := $spec }}
{{- $v := index $ $key }}
{{- $_ := set $out $key (ternary $entry.default $v (kindIs "invalid" $v)) }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/*
Settings the chart computes with (grace period, readiness delay, probes) are
always written to the ConfigMap with their effective value, so nothing else
(e.g. a variable in an extraEnvFrom source) can change them behind the checks.
*/}}
{{- define "pgcg.pinnedSettings" -}}
[heartbeatInterval, sessionTimeout, drainDeadline, httpPort]
{{- end }}

{{/*
The data of one workload's ConfigMap: the settings its processes read, the
OTEL_* variables, and settings.extra. Pods carry a checksum of exactly this.
Call with (dict "root" $ "component" "consumer" "settings" $settings "readers"
(list "consumer" "coordinator")).
*/}}
{{- define "pgcg.configData" -}}
{{- $root := .root }}
{{- $settings := .settings }}
{{- $effective := include "pgcg.effectiveSettings" $settings | fromYaml }}
{{- $pinned := include "pgcg.pinnedSettings" . | fromYamlArray }}
{{- $data := dict }}
{{- range $key, $entry := (include "pgcg.settingsSpec" . | fromYaml) }}
{{- $read := false }}
{{- range $entry.readers }}
{{- if has . $.readers }}
{{- $read = true }}
{{- end }}
{{- end }}
{{- $given := index $settings $key }}
{{- if and $read (or (not (kindIs "invalid" $given)) (has $key $pinned)) }}
{{- $_ := set $data $entry.env (include "pgcg.number" (get $effective $key)) }}
{{- end }}
{{- end }}
{{- with $root.Values.otlp }}
{{- if .enabled }}
{{- $_ := set $data "OTEL_TRACES_EXPORTER" "otlp" }}
{{- $_ := set $data "OTEL_EXPORTER_OTLP_ENDPOINT" .endpoint }}
{{- $_ := set $data "OTEL_EXPORTER_OTLP_PROTOCOL" .protocol }}
{{- $_ := set $data "OTEL_TRACES_SAMPLER" .sampler }}
{{- $_ := set $data "OTEL_TRACES_SAMPLER_ARG" (.samplerArg | toString) }}
{{- else }}
{{- /* No collector configured: without this an SDK would try localhost:4318. */}}
{{- $_ := set $data "OTEL_TRACES_EXPORTER" "none" }}
{{- end }}
{{- end }}
{{- $extra := dict }}
{{- range $k, $v := ($settings.extra | default dict) }}
{{- $_ := set $extra $k ($v | toString) }}
{{- end }}
{{- toYaml (merge $data $extra) }}
{{- end }}

{{/* What a workload's processes read: consumers with an embedded coordinator read both. */}}
{{- define "pgcg.readers" -}}
{{- if eq .component "coordinator" }}
[coordinator]
{{- else if .root.Values.embeddedCoordinator }}
[consumer, coordinator]
{{- else }}
[consumer]
{{- end }}
{{- end }}

{{/*
Consumer pods' grace period: the drain deadline, then up to 10 s to flush
results, release partitions and leave the group (the consumer bounds that step
to 10 s), then 10 s for the process to exit (telemetry flush). Call with
(dict "config" $groupConfig).
*/}}
{{- define "pgcg.consumer.leaveSeconds" -}}
10
{{- end }}

{{- define "pgcg.consumer.terminationGracePeriodSeconds" -}}
{{- $drain := ceil (get (include "pgcg.effectiveSettings" .config.settings | fromYaml) "drainDeadline") | int }}
{{- if .config.terminationGracePeriodSeconds }}
{{- .config.terminationGracePeriodSeconds | int }}
{{- else }}
{{- add $drain (include "pgcg.consumer.leaveSeconds" .) 10 }}
{{- end }}
{{- end }}

{{/* A new consumer stays ready this long before the next old one stops. */}}
{{- define "pgcg.consumer.minReadySeconds" -}}
{{- if kindIs "invalid" .config.minReadySeconds }}
{{- ceil (get (include "pgcg.effectiveSettings" .config.settings | fromYaml) "sessionTimeout") | int }}
{{- else }}
{{- .config.minReadySeconds | int }}
{{- end }}
{{- end }}

{{/*
Environment every long-running pgcg container gets besides its ConfigMap: the
DSN from its Secret, OTLP identity when tracing is on, then extraEnv.
Call with (dict "root" $ "component" "consumer" "workload" $deploymentName "extraEnv" $list).
*/}}
{{- define "pgcg.env" -}}
- name: PGCG_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "pgcg.databaseSecretName" .root }}
      key: {{ include "pgcg.databaseSecretKey" .root }}
# Anything that wants a writable home (caches, ~/.config) gets the emptyDir.
- name: HOME
  value: /tmp
{{- with .root.Values.otlp }}
{{- if .enabled }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: OTEL_SERVICE_NAME
  value: {{ .serviceName | default (printf "%s-%s" (include "pgcg.fullname" $.root) $.component) | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  {{- $attrs := list "k8s.namespace.name=$(POD_NAMESPACE)" "k8s.pod.name=$(POD_NAME)" (printf "k8s.deployment.name=%s" $.workload) }}
  {{- range $k, $v := .resourceAttributes }}
  {{- $attrs = append $attrs (printf "%s=%s" $k (toString $v)) }}
  {{- end }}
  value: {{ join "," $attrs | quote }}
{{- if .headersSecret.name }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  valueFrom:
    secretKeyRef:
      name: {{ .headersSecret.name }}
      key: {{ .headersSecret.key }}
{{- end }}
{{- end }}
{{- end }}
{{- with .extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The writable /tmp every container gets under a read-only root. */}}
{{- define "pgcg.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{- define "pgcg.tmpVolume" -}}
- name: tmp
  emptyDir: {}
{{- end }}

{{/*
Pod template annotations: a checksum of the ConfigMap data this workload reads
and, when the chart made it, of the DSN; then the workload's podAnnotations.
Call with (dict "root" $ "config" $configDataYaml "podAnnotations" $map).
*/}}
{{- define "pgcg.podAnnotations" -}}
{{- $annotations := dict "checksum/config" (sha256sum .config) }}
{{- if not .root.Values.database.existingSecret }}
{{- $_ := set $annotations "checksum/database" (sha256sum .root.Values.database.url) }}
{{- end }}
{{- toYaml (merge $annotations (deepCopy (.podAnnotations | default dict))) }}
{{- end }}

{{/*
The sum of the group_lag function's rows for one group, as KEDA's postgresql trigger
query. pgcg.group_lag(group) is the one definition of a group's lag (pgcg status
shows the same number); it must stay cheap on any backlog, since KEDA runs it
every pollingInterval. The group name goes in as a quoted SQL literal; group
names cannot contain quotes (values.schema.json), and doubling them anyway keeps
the literal well-formed whatever the schema allows later.
Call with (dict "group" $name).
*/}}
{{- define "pgcg.lagQuery" -}}
{{- printf "SELECT coalesce(sum(lag), 0) AS lag FROM pgcg.group_lag('%s')" (replace "'" "''" .group) }}
{{- end }}

{{/*
Extra pod parts every workload may add: volumes beside /tmp, mounts beside /tmp,
init containers, sidecars. Container lists are given in full by the user.
*/}}
{{- define "pgcg.volumes" -}}
{{- include "pgcg.tmpVolume" . }}
{{- with .extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "pgcg.volumeMounts" -}}
{{- include "pgcg.tmpVolumeMount" . }}
{{- with .extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}
