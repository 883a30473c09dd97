{{/*
Names and labels. Every object's name starts with pgcg.fullname; every object
carries pgcg.labels; selectors use only the stable subset (name, instance,
component and, for consumers, group).
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

{{- define "pgcg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pgcg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pgcg.labels" -}}
helm.sh/chart: {{ include "pgcg.chart" . }}
{{ include "pgcg.selectorLabels" . }}
app.kubernetes.io/version: {{ (.Values.image.tag | default .Chart.AppVersion) | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pgcg
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Component labels. Call with (dict "root" $ "component" "coordinator") or, for
a consumer group, (dict "root" $ "component" "consumer" "group" $name).
*/}}
{{- define "pgcg.componentSelectorLabels" -}}
{{ include "pgcg.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- if .group }}
pgcg/group: {{ include "pgcg.groupLabel" .group }}
{{- end }}
{{- end }}

{{- define "pgcg.componentLabels" -}}
{{ include "pgcg.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- if .group }}
pgcg/group: {{ include "pgcg.groupLabel" .group }}
{{- end }}
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
print as 1e+06; whole numbers are printed as integers instead.
*/}}
{{- define "pgcg.number" -}}
{{- if eq (float64 .) (floor .) }}
{{- int64 . }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/*
A group's effective settings: `consumer` defaults, with every key the group
sets replacing the default (set, not mergeOverwrite, so replicas: 0 and
enabled: false are honoured), image merged key by key, and keda merged over
the top-level `keda` the same way. Returns YAML; callers use fromYaml.
Call with (dict "root" $ "name" $name "group" $group).
*/}}
{{- define "pgcg.groupConfig" -}}
{{- $root := .root }}
{{- $c := deepCopy $root.Values.consumer }}
{{- range $k, $v := .group }}
{{- $_ := set $c $k $v }}
{{- end }}
{{- $_ := set $c "image" (merge (deepCopy (.group.image | default dict)) (deepCopy ($root.Values.consumer.image | default dict)) (deepCopy $root.Values.image)) }}
{{- $keda := deepCopy $root.Values.keda }}
{{- range $k, $v := (.group.keda | default dict) }}
{{- $_ := set $keda $k $v }}
{{- end }}
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

{{/* Consumer pods' grace period: drain deadline plus room to leave the group. */}}
{{- define "pgcg.consumer.terminationGracePeriodSeconds" -}}
{{- if .config.terminationGracePeriodSeconds }}
{{- .config.terminationGracePeriodSeconds | int }}
{{- else }}
{{- add (ceil .root.Values.settings.drainDeadline) 20 }}
{{- end }}
{{- end }}

{{/*
Environment every long-running pgcg container gets besides the ConfigMap: the
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

{{/* Annotations that roll pods when their configuration changes. */}}
{{- define "pgcg.checksumAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if not .Values.database.existingSecret }}
checksum/database: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
{{- end }}

{{/*
Checks values.schema.json cannot express (relations between keys). Included
from configmap.yaml, which every render has.
*/}}
{{- define "pgcg.validate" -}}
{{- $s := .Values.settings }}
{{- if not (lt (float64 $s.heartbeatInterval) (float64 $s.sessionTimeout)) }}
{{- fail (printf "settings.heartbeatInterval (%v) must be less than settings.sessionTimeout (%v): members would be evicted between heartbeats" $s.heartbeatInterval $s.sessionTimeout) }}
{{- end }}
{{- $trusted := subf (float64 $s.sessionTimeout) (maxf 1.0 (mulf (float64 $s.sessionTimeout) 0.2)) }}
{{- if lt (float64 $s.drainDeadline) $trusted }}
{{- fail (printf "settings.drainDeadline (%v) must be at least settings.sessionTimeout minus the lease margin (%v): a forced hand-off could overtake an owner that never heard of its revocation" $s.drainDeadline $trusted) }}
{{- end }}
{{- if and (not .Values.database.existingSecret) (not .Values.database.url) }}
{{- fail "set database.existingSecret (the name of a Secret holding the DSN) or database.url" }}
{{- end }}
{{- if and .Values.otlp.enabled (not .Values.otlp.endpoint) }}
{{- fail "otlp.enabled is true but otlp.endpoint is empty" }}
{{- end }}
{{- $names := dict }}
{{- $labels := dict }}
{{- range $name, $group := .Values.groups }}
{{- $c := include "pgcg.groupConfig" (dict "root" $ "name" $name "group" $group) | fromYaml }}
{{- $slug := include "pgcg.groupSlug" $name }}
{{- if hasKey $names $slug }}
{{- fail (printf "groups %q and %q would both be deployed as %s; rename one" (get $names $slug) $name (include "pgcg.consumer.fullname" (dict "root" $ "group" $name))) }}
{{- end }}
{{- $_ := set $names $slug $name }}
{{- $label := include "pgcg.groupLabel" $name }}
{{- if hasKey $labels $label }}
{{- fail (printf "groups %q and %q would share the label pgcg/group=%s; rename one" (get $labels $label) $name $label) }}
{{- end }}
{{- $_ := set $labels $label $name }}
{{- if $c.terminationGracePeriodSeconds }}
{{- if not (gt (float64 $c.terminationGracePeriodSeconds) (float64 $s.drainDeadline)) }}
{{- fail (printf "groups.%s: terminationGracePeriodSeconds (%v) must exceed settings.drainDeadline (%v), or consumers are killed mid-drain" $name $c.terminationGracePeriodSeconds $s.drainDeadline) }}
{{- end }}
{{- end }}
{{- if $c.keda.enabled }}
{{- if gt (int $c.keda.minReplicaCount) (int $c.keda.maxReplicaCount) }}
{{- fail (printf "groups.%s: keda.minReplicaCount (%v) exceeds keda.maxReplicaCount (%v)" $name $c.keda.minReplicaCount $c.keda.maxReplicaCount) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The group_lag_total query (files/lag.sql) for one group: comment lines dropped,
lines joined, the group name as a quoted SQL literal in place of %(group)s.
Group names cannot contain quotes (values.schema.json); doubling them anyway
keeps the literal well-formed whatever the schema allows later.
Call with (dict "root" $ "group" $name).
*/}}
{{- define "pgcg.lagQuery" -}}
{{- $lines := list }}
{{- range splitList "\n" (.root.Files.Get "files/lag.sql") }}
{{- $line := trim . }}
{{- if and $line (not (hasPrefix "--" $line)) }}
{{- $lines = append $lines $line }}
{{- end }}
{{- end }}
{{- $literal := printf "'%s'" (replace "'" "''" .group) }}
{{- join " " $lines | replace "%(group)s" $literal }}
{{- end }}
