{{/*
Checks values.schema.json cannot express: a number given as a string (its
bounds), rules between settings (the same as pgcg's Settings model checks at
start-up, so a render that passes never crash-loops on them), and relations
between keys. Included from validate.yaml, which renders nothing.
*/}}

{{/*
Bounds of every number in one settings map, for numbers that came as strings
(`--set settings.drainDeadline=12.5`); the schema has checked the others too.
Call with (dict "path" "settings" "settings" $map).
*/}}
{{- define "pgcg.validateBounds" -}}
{{- $path := .path }}
{{- $given := .settings | default dict }}
{{- range $key, $entry := (include "pgcg.settingsSpec" . | fromYaml) }}
{{- $v := index $given $key }}
{{- if and (not (kindIs "invalid" $v)) (has $entry.type (list "number" "integer")) }}
{{- $n := float64 $v }}
{{- $shown := printf "%s.%s (%v)" $path $key $v }}
{{- if and (hasKey $entry "minimum") (lt $n (float64 $entry.minimum)) }}
{{- fail (printf "%s must be at least %v" $shown $entry.minimum) }}
{{- end }}
{{- if and (hasKey $entry "exclusiveMinimum") (le $n (float64 $entry.exclusiveMinimum)) }}
{{- fail (printf "%s must be greater than %v" $shown $entry.exclusiveMinimum) }}
{{- end }}
{{- if and (hasKey $entry "maximum") (gt $n (float64 $entry.maximum)) }}
{{- fail (printf "%s must be at most %v" $shown $entry.maximum) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The rules between settings of pgcg's Settings model, on one workload's effective
settings. Call with (dict "where" "groups.billing: " "settings" $map).
*/}}
{{- define "pgcg.validateSettings" -}}
{{- $s := include "pgcg.effectiveSettings" .settings | fromYaml }}
{{- $where := .where }}
{{- $heartbeat := float64 $s.heartbeatInterval }}
{{- $session := float64 $s.sessionTimeout }}
{{- $drain := float64 $s.drainDeadline }}
{{- if gt (mulf $heartbeat 2.0) $session }}
{{- fail (printf "%ssettings.heartbeatInterval (%v) must be at most half of settings.sessionTimeout (%v): one late heartbeat would expel a healthy member" $where $s.heartbeatInterval $s.sessionTimeout) }}
{{- end }}
{{- if lt (float64 $s.retryMax) (float64 $s.retryBase) }}
{{- fail (printf "%ssettings.retryMax (%v) must not be smaller than settings.retryBase (%v)" $where $s.retryMax $s.retryBase) }}
{{- end }}
{{- /* The model allows 1e-9 of slack at this boundary for binary floats; so do we. */}}
{{- $trusted := subf $session (maxf 1.0 (mulf $session 0.2)) }}
{{- if lt $drain (subf $trusted 0.000000001) }}
{{- fail (printf "%ssettings.drainDeadline (%v) must be at least settings.sessionTimeout minus the lease margin (%v): a forced hand-off could overtake an owner that never heard of its revocation" $where $s.drainDeadline $trusted) }}
{{- end }}
{{- end }}

{{/*
Variables the chart sets from checked values may not come from extraEnv too:
an extraEnv PGCG_DRAIN_DEADLINE would escape the grace period check, and a
duplicate name is refused by server-side apply. Call with (dict "where"
"coordinator" "env" $list).
*/}}
{{- define "pgcg.validateExtraEnv" -}}
{{- $where := .where }}
{{- $reserved := list "PGCG_DATABASE_URL" "HOME" }}
{{- range $key, $entry := (include "pgcg.settingsSpec" . | fromYaml) }}
{{- $reserved = append $reserved $entry.env }}
{{- end }}
{{- range .env }}
{{- if has .name $reserved }}
{{- if eq .name "PGCG_DATABASE_URL" }}
{{- fail (printf "%s.extraEnv sets PGCG_DATABASE_URL: the chart sets it from database.* (or migrations.existingSecret)" $where) }}
{{- else if eq .name "HOME" }}
{{- fail (printf "%s.extraEnv sets HOME, which the chart points at the writable /tmp" $where) }}
{{- else }}
{{- fail (printf "%s.extraEnv sets %s: use the setting in settings (or the group's settings), which the chart checks" $where .name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The pgcg extras a workload's image needs for its settings. */}}
{{- define "pgcg.validateExtras" -}}
{{- $extras := .image.extras | default list }}
{{- $s := include "pgcg.effectiveSettings" .settings | fromYaml }}
{{- if and .root.Values.otlp.enabled (eq .root.Values.otlp.protocol "grpc") (not (has "grpc" $extras)) }}
{{- fail (printf "%s: otlp.protocol grpc needs the gRPC exporter, which the image %s lacks: build it with --build-arg PGCG_EXTRAS=grpc and add grpc to image.extras, or use http/protobuf" .where (include "pgcg.image" .)) }}
{{- end }}
{{- if and $s.instrumentPsycopg (not (has "otel" $extras)) }}
{{- fail (printf "%s: settings.instrumentPsycopg needs the otel extra, which the image %s lacks: build it with --build-arg PGCG_EXTRAS=otel and add otel to image.extras" .where (include "pgcg.image" .)) }}
{{- end }}
{{- end }}

{{- define "pgcg.validate" -}}
{{- include "pgcg.validateBounds" (dict "path" "settings" "settings" .Values.settings) }}
{{- include "pgcg.validateBounds" (dict "path" "consumer.settings" "settings" .Values.consumer.settings) }}
{{- include "pgcg.validateExtraEnv" (dict "where" "migrations" "env" .Values.migrations.extraEnv) }}
{{- include "pgcg.validateExtraEnv" (dict "where" "consumer" "env" .Values.consumer.extraEnv) }}
{{- include "pgcg.validateSettings" (dict "where" "" "settings" .Values.settings) }}
{{- if not .Values.embeddedCoordinator }}
{{- include "pgcg.validateExtraEnv" (dict "where" "coordinator" "env" .Values.coordinator.extraEnv) }}
{{- include "pgcg.validateExtras" (dict "root" $ "where" "coordinator" "image" .Values.image "settings" .Values.settings) }}
{{- end }}
{{- if and (not .Values.database.existingSecret) (not .Values.database.url) }}
{{- fail "set database.existingSecret (the name of a Secret holding the DSN) or database.url" }}
{{- end }}
{{- if and .Values.otlp.enabled (not .Values.otlp.endpoint) }}
{{- fail "otlp.enabled is true but otlp.endpoint is empty" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled }}
{{- fail "metrics.serviceMonitor and metrics.podMonitor both scrape every pod: enable one of them" }}
{{- end }}
{{- $names := dict }}
{{- $labels := dict }}
{{- range $name, $group := .Values.groups }}
{{- $c := include "pgcg.groupConfig" (dict "root" $ "name" $name "group" $group) | fromYaml }}
{{- $where := printf "groups.%s" $name }}
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
{{- include "pgcg.validateBounds" (dict "path" (printf "%s.settings" $where) "settings" ($group.settings | default dict)) }}
{{- include "pgcg.validateSettings" (dict "where" (printf "%s: " $where) "settings" $c.settings) }}
{{- include "pgcg.validateExtraEnv" (dict "where" $where "env" $c.extraEnv) }}
{{- include "pgcg.validateExtras" (dict "root" $ "where" $where "image" $c.image "settings" $c.settings) }}
{{- if $c.terminationGracePeriodSeconds }}
{{- $drain := ceil (get (include "pgcg.effectiveSettings" $c.settings | fromYaml) "drainDeadline") | int }}
{{- $needed := add $drain (include "pgcg.consumer.leaveSeconds" .) }}
{{- if lt (int $c.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "%s: terminationGracePeriodSeconds (%v) must be at least the drain deadline (%v s) plus %v s to flush, release and leave (%v), or consumers are killed mid-drain" $where $c.terminationGracePeriodSeconds $drain (include "pgcg.consumer.leaveSeconds" .) $needed) }}
{{- end }}
{{- end }}
{{- if $c.keda.enabled }}
{{- if gt (int $c.keda.minReplicaCount) (int $c.keda.maxReplicaCount) }}
{{- fail (printf "%s: keda.minReplicaCount (%v) exceeds keda.maxReplicaCount (%v)" $where $c.keda.minReplicaCount $c.keda.maxReplicaCount) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
