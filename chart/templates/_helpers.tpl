{{/*
Names, labels and the pieces every template shares. Resource names are DNS labels of at most
63 characters; a model's StatefulSet name is kept under 53 (see dispatcher.validate).
*/}}

{{- define "dispatcher.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dispatcher.fullname" -}}
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

{{- define "dispatcher.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dispatcher.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dispatcher.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dispatcher.labels" -}}
helm.sh/chart: {{ include "dispatcher.chart" . }}
{{ include "dispatcher.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: aristote-dispatcher
{{- end }}

{{/* Labels of one component: call with (dict "ctx" $ "component" "sender"). */}}
{{- define "dispatcher.componentLabels" -}}
{{ include "dispatcher.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "dispatcher.componentSelectorLabels" -}}
{{ include "dispatcher.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Selector labels of one model's pods: (dict "ctx" $ "model" $m). */}}
{{- define "dispatcher.modelSelectorLabels" -}}
{{ include "dispatcher.componentSelectorLabels" (dict "ctx" .ctx "component" "model") }}
aristote-dispatcher/model: {{ .model.name }}
{{- end }}

{{- define "dispatcher.modelFullname" -}}
{{- printf "%s-%s" (include "dispatcher.fullname" .ctx) .model.name }}
{{- end }}

{{/* image: (dict "image" .Values.sender.image "ctx" $) */}}
{{- define "dispatcher.image" -}}
{{- printf "%s:%s" .image.repository (toString (default .ctx.Chart.AppVersion .image.tag)) }}
{{- end }}

{{/* The served model name: what clients send, what the consumer announces (MODEL). */}}
{{- define "dispatcher.servedModelName" -}}
{{- default .model .servedModelName }}
{{- end }}

{{/* A model's own value when it sets one (0 and false included), else the chart-wide default:
     (dict "model" $m "key" "maxParallelRequests" "default" .Values.consumer.maxParallelRequests) */}}
{{- define "dispatcher.modelValue" -}}
{{- if and (hasKey .model .key) (not (kindIs "invalid" (index .model .key))) }}
{{- index .model .key }}
{{- else }}
{{- .default }}
{{- end }}
{{- end }}

{{/*
A secret value that stays the same across upgrades: the given value when set, else the value
already stored in the cluster's Secret, else a new random one. `helm template` has no cluster to
read, so it renders a new random value each time.
(dict "ctx" $ "value" .Values.x "secret" "name" "key" "password")
*/}}
{{- define "dispatcher.stableSecret" -}}
{{- if .value }}
{{- .value }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .secret }}
{{- if and $existing $existing.data (hasKey $existing.data .key) }}
{{- index $existing.data .key | b64dec }}
{{- else }}
{{- randAlphaNum 32 }}
{{- end }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------
Secrets: names and keys. Every password and token reaches a pod through a secretKeyRef. */}}

{{- define "dispatcher.databaseSecretName" -}}
{{- default (printf "%s-database" (include "dispatcher.fullname" .)) .Values.database.existingSecret }}
{{- end }}

{{/* The database of database.type: its host (the internal server's Service is named after the
type), port, image, and the Secret key of the internal server's superuser password. */}}
{{- define "dispatcher.databaseHost" -}}
{{- if .Values.database.internal }}
{{- printf "%s-%s" (include "dispatcher.fullname" .) .Values.database.type }}
{{- else }}
{{- .Values.database.host }}
{{- end }}
{{- end }}

{{- define "dispatcher.databasePort" -}}
{{- .Values.database.port | default (ternary 3306 5432 (eq .Values.database.type "mysql")) }}
{{- end }}

{{- define "dispatcher.databaseImage" -}}
{{- $mysql := eq .Values.database.type "mysql" }}
{{- $image := .Values.database.image }}
{{- printf "%s:%s" ($image.repository | default (ternary "mysql" "postgres" $mysql)) (toString ($image.tag | default (ternary "8.4" "17" $mysql))) }}
{{- end }}

{{- define "dispatcher.databaseRootPasswordKey" -}}
{{- ternary "mysql-root-password" "postgres-password" (eq .Values.database.type "mysql") }}
{{- end }}

{{- define "dispatcher.rabbitmqClusterName" -}}
{{- printf "%s-rabbitmq" (include "dispatcher.fullname" .) }}
{{- end }}

{{- define "dispatcher.rabbitmqSecretName" -}}
{{- if .Values.rabbitmq.internal }}
{{- printf "%s-default-user" (include "dispatcher.rabbitmqClusterName" .) }}
{{- else }}
{{- default (printf "%s-rabbitmq" (include "dispatcher.fullname" .)) .Values.rabbitmq.existingSecret }}
{{- end }}
{{- end }}

{{- define "dispatcher.rabbitmqHost" -}}
{{- if .Values.rabbitmq.internal }}
{{- include "dispatcher.rabbitmqClusterName" . }}
{{- else }}
{{- .Values.rabbitmq.host }}
{{- end }}
{{- end }}

{{- define "dispatcher.tokensSecretName" -}}
{{- default (printf "%s-tokens" (include "dispatcher.fullname" .)) .Values.tokensExistingSecret }}
{{- end }}

{{- define "dispatcher.inferenceSecretName" -}}
{{- printf "%s-inference" (include "dispatcher.fullname" .) }}
{{- end }}

{{- define "dispatcher.apiKeySecretName" -}}
{{- default (include "dispatcher.inferenceSecretName" .) .Values.inferenceserver.existingSecret }}
{{- end }}

{{/* The tokens list as admin.py load reads it, with the chart's defaults filled in. */}}
{{- define "dispatcher.tokensYaml" -}}
{{- $entries := list }}
{{- range .Values.tokens }}
{{- $entry := dict "token" (toString .token) "priority" (ternary .priority 1 (hasKey . "priority")) "threshold" (ternary .threshold 10 (hasKey . "threshold")) }}
{{- if .name }}{{ $_ := set $entry "name" .name }}{{ end }}
{{- if .max_in_flight }}{{ $_ := set $entry "max_in_flight" (int .max_in_flight) }}{{ end }}
{{- $entries = append $entries $entry }}
{{- end }}
{{- toYaml $entries }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------
Environment shared by the sender and the consumer (DESIGN.md: "Both services"). */}}

{{/* (dict "ctx" $ "component" .Values.sender) */}}
{{- define "dispatcher.rabbitmqEnv" -}}
- name: RABBITMQ_HOST
  value: {{ include "dispatcher.rabbitmqHost" .ctx | quote }}
- name: RABBITMQ_PORT
  value: {{ .ctx.Values.rabbitmq.port | quote }}
- name: RABBITMQ_USER
  valueFrom:
    secretKeyRef:
      name: {{ include "dispatcher.rabbitmqSecretName" .ctx }}
      key: username
- name: RABBITMQ_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "dispatcher.rabbitmqSecretName" .ctx }}
      key: password
- name: LOG_LEVEL
  value: {{ .component.logLevel | quote }}
- name: RPC_RECONNECT_ATTEMPTS
  value: {{ .component.rpcReconnectAttempts | quote }}
- name: MAX_PRIORITY
  value: {{ .ctx.Values.maxPriority | quote }}
{{- end }}

{{/* DATABASE_URL without the password in the manifest: Kubernetes expands $(DB_USER) and
$(DB_PASSWORD) from the variables defined just before it. */}}
{{- define "dispatcher.databaseEnv" -}}
- name: DB_USER
  value: {{ .Values.database.auth.username | quote }}
- name: DB_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "dispatcher.databaseSecretName" . }}
      key: password
- name: DATABASE_URL
  value: {{ printf "%s://$(DB_USER):$(DB_PASSWORD)@%s:%s/%s" .Values.database.type (include "dispatcher.databaseHost" .) (include "dispatcher.databasePort" .) .Values.database.auth.database | quote }}
{{- end }}

{{/* Writable /tmp for containers with a read-only root file system. */}}
{{- define "dispatcher.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* ---------------------------------------------------------------------------------------
Render-time checks: a configuration the services cannot run fails here, with a message that
says what to change, instead of deploying something broken. */}}
{{- define "dispatcher.validate" -}}
{{- $db := .Values.database }}
{{- if not (has $db.type (list "postgresql" "mysql")) }}
{{- fail (printf "database.type=%s is unknown: use postgresql or mysql" $db.type) }}
{{- end }}
{{- if and (not $db.internal) (not $db.host) }}
{{- fail "database.host is required when database.internal=false (the external PostgreSQL or MySQL server)" }}
{{- end }}
{{- $superuser := ternary "root" "postgres" (eq $db.type "mysql") }}
{{- if and $db.internal (eq $db.auth.username $superuser) }}
{{- fail (printf "database.auth.username must not be %s: that is the internal server's superuser (database.auth.rootPassword)" $superuser) }}
{{- end }}
{{- if and (not $db.internal) (not $db.existingSecret) (not $db.auth.password) }}
{{- fail "database.auth.password or database.existingSecret is required when database.internal=false" }}
{{- end }}
{{- $mq := .Values.rabbitmq }}
{{- if not $mq.internal }}
{{- if not $mq.host }}
{{- fail "rabbitmq.host is required when rabbitmq.internal=false (the external broker)" }}
{{- end }}
{{- if and (not $mq.existingSecret) (or (not $mq.auth.user) (not $mq.auth.password)) }}
{{- fail "rabbitmq.auth.user and rabbitmq.auth.password, or rabbitmq.existingSecret, are required when rabbitmq.internal=false" }}
{{- end }}
{{- end }}
{{- if ne (int .Values.consumer.replicaCount) 1 }}
{{- fail "consumer.replicaCount must be 1: the consumer runs beside each vLLM (one per model pod); scale a model with models[].replicaCount" }}
{{- end }}
{{- if not (has .Values.inferenceserver.ropeScalingArgs (list "hf-overrides" "rope-flags")) }}
{{- fail "inferenceserver.ropeScalingArgs must be hf-overrides or rope-flags" }}
{{- end }}
{{- $names := dict }}
{{- range $index, $m := .Values.models }}
{{- if not $m.name }}
{{- fail (printf "models[%d].name is required (kebab case, used in resource names)" $index) }}
{{- end }}
{{- if not $m.model }}
{{- fail (printf "models[%d] (%s): model (the Hugging Face id) is required" $index $m.name) }}
{{- end }}
{{- if hasKey $names $m.name }}
{{- fail (printf "models[%d]: the name %s is used twice" $index $m.name) }}
{{- end }}
{{- $_ := set $names $m.name true }}
{{- $sts := include "dispatcher.modelFullname" (dict "ctx" $ "model" $m) }}
{{- if gt (len $sts) 52 }}
{{- fail (printf "models[%d]: the StatefulSet name %s is longer than 52 characters; shorten the model's name or the release name (or set fullnameOverride)" $index $sts) }}
{{- end }}
{{- if and $m.ropeScaling $m.ropeScaling.enabled }}
{{- $rope := fromJson (default "{}" $m.ropeScaling.jsonConfiguration) }}
{{- if hasKey $rope "Error" }}
{{- fail (printf "models[%d] (%s): ropeScaling.jsonConfiguration is not a JSON object: %s" $index $m.name $rope.Error) }}
{{- end }}
{{- if and (not $rope) (not $m.ropeScaling.theta) }}
{{- fail (printf "models[%d] (%s): ropeScaling.enabled needs jsonConfiguration or theta" $index $m.name) }}
{{- end }}
{{- end }}
{{- if and $m.chatTemplate $m.chatTemplatePath }}
{{- fail (printf "models[%d] (%s): set chatTemplate (the template itself) or chatTemplatePath (a file in the vLLM container), not both" $index $m.name) }}
{{- end }}
{{- end }}
{{- end }}
