{{/* Names, labels and the pieces every pod of the chart shares. */}}

{{- define "mljob.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mljob.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Cluster-scoped objects carry the release namespace too: two releases of the same name in
two namespaces must not fight over one ClusterRole. */}}
{{- define "mljob.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "mljob.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mljob.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "mljob.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mljob
{{- end -}}

{{/* Selector labels of one component (operator, collector, worker-<pipeline>). */}}
{{- define "mljob.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mljob.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mljob.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mljob.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mljob.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}

{{/* One connection variable: from an existing Secret when one is named, else the plain value. */}}
{{- define "mljob.connEnv" -}}
- name: {{ .env }}
{{- if .conn.existingSecret.name }}
  valueFrom:
    secretKeyRef:
      name: {{ .conn.existingSecret.name }}
      key: {{ .conn.existingSecret.key }}
{{- else }}
  value: {{ get .conn .field | quote }}
{{- end }}
{{- end -}}

{{/* NATS: what workers need too. */}}
{{- define "mljob.natsEnv" -}}
{{ include "mljob.connEnv" (dict "env" "MLJOB_NATS_URL" "conn" .Values.nats "field" "url") }}
{{- if .Values.nats.tls.caSecret.name }}
- name: MLJOB_NATS_TLS_CA_FILE
  value: /etc/mljob/tls/nats/{{ .Values.nats.tls.caSecret.key }}
{{- end }}
{{- end -}}

{{/* Every connection of the operator and the collector, and the settings they share. */}}
{{- define "mljob.storesEnv" -}}
{{ include "mljob.natsEnv" . }}
{{ include "mljob.connEnv" (dict "env" "MLJOB_REDIS_URL" "conn" .Values.redis "field" "url") }}
- name: MLJOB_REDIS_PREFIX
  value: {{ .Values.redis.prefix | quote }}
{{- if .Values.redis.tls.caSecret.name }}
- name: MLJOB_REDIS_TLS_CA_FILE
  value: /etc/mljob/tls/redis/{{ .Values.redis.tls.caSecret.key }}
{{- end }}
{{ include "mljob.connEnv" (dict "env" "MLJOB_POSTGRES_DSN" "conn" .Values.postgres "field" "dsn") }}
{{- if .Values.postgres.schema }}
- name: MLJOB_POSTGRES_SCHEMA
  value: {{ .Values.postgres.schema | quote }}
{{- end }}
{{- if .Values.postgres.tls.caSecret.name }}
- name: MLJOB_POSTGRES_TLS_CA_FILE
  value: /etc/mljob/tls/postgres/{{ .Values.postgres.tls.caSecret.key }}
{{/* libpq reads these itself, so TLS to Postgres works before the settings model knows the file. */}}
- name: PGSSLROOTCERT
  value: /etc/mljob/tls/postgres/{{ .Values.postgres.tls.caSecret.key }}
- name: PGSSLMODE
  value: {{ .Values.postgres.tls.sslMode | quote }}
{{- end }}
{{- end -}}

{{/* HOME and TMPDIR on the scratch volume: the root filesystem is read-only. */}}
{{- define "mljob.runtimeEnv" -}}
- name: HOME
  value: /tmp
- name: TMPDIR
  value: /tmp
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: POD_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end -}}

{{/* TLS CA volumes of the connections this pod uses (`stores`: all three, else NATS only). */}}
{{- define "mljob.tlsVolumes" -}}
{{- $root := .root -}}
{{- $names := list "nats" -}}
{{- if .stores }}{{- $names = list "nats" "redis" "postgres" -}}{{- end }}
{{- range $names }}
{{- $conn := get $root.Values . }}
{{- if $conn.tls.caSecret.name }}
- name: tls-{{ . }}
  secret:
    secretName: {{ $conn.tls.caSecret.name }}
    items:
      - key: {{ $conn.tls.caSecret.key }}
        path: {{ $conn.tls.caSecret.key }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "mljob.tlsMounts" -}}
{{- $root := .root -}}
{{- $names := list "nats" -}}
{{- if .stores }}{{- $names = list "nats" "redis" "postgres" -}}{{- end }}
{{- range $names }}
{{- $conn := get $root.Values . }}
{{- if $conn.tls.caSecret.name }}
- name: tls-{{ . }}
  mountPath: /etc/mljob/tls/{{ . }}
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{- /*
Exactly what the operator calls (operator/mljob/adapters/kube.py and kopf):
  mljobs          get (re-read a job), list/watch (kopf; the orphan sweep's LIST),
                  patch (kopf: finalizer, progress and diff-base annotations), delete (TTL)
  mljobs/status   get, patch (merge patches of progress; guarded JSON patches of the phase)
  configmaps      get (spec.itemsFrom)
  events          create (the operator's own Events; kopf's event posting is off)
*/}}
{{- define "mljob.operatorRules" -}}
- apiGroups: [mljob.dev]
  resources: [mljobs]
  verbs: [get, list, watch, patch, delete]
- apiGroups: [mljob.dev]
  resources: [mljobs/status]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- if .Values.ha.enabled }}
# kopf peering: the operators announce themselves in the peering object's status.
{{- if .Values.watchNamespaces }}
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- else }}
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end }}
{{- end -}}
