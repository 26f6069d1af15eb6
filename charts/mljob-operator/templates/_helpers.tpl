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

{{/* The read-only API's ServiceAccount: its own, so it holds none of the operator's rights. */}}
{{- define "mljob.apiServiceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- printf "%s-api" (include "mljob.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* What the read-only API reads of MLJobs: a job's status and UID, a namespace's listing. */}}
{{- define "mljob.apiJobRules" -}}
- apiGroups: [mljob.dev]
  resources: [mljobs]
  verbs: [get, list]
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

{{/*
The NATS identity of one role (`role`: operator, collector or workers), as YAML for fromYaml:
`kind` creds (a .creds file from a Secret), user (user/password from a Secret) or none, the
Secret and its keys, and `where` (the values it came from, for messages). A worker's own
`natsCredentials` (`override`) replaces the role's default when it names a Secret.
*/}}
{{- define "mljob.natsIdentity" -}}
{{- $id := dig "credentials" .role dict .root.Values.nats -}}
{{- $where := printf "nats.credentials.%s" .role -}}
{{- with .override -}}
{{- if or (dig "credsSecret" "name" "" .) (dig "userSecret" "name" "" .) -}}
{{- $id = . -}}
{{- $where = $.where -}}
{{- end -}}
{{- end -}}
{{- $creds := dig "credsSecret" dict $id -}}
{{- $user := dig "userSecret" dict $id -}}
{{- if and $creds.name $user.name -}}
{{- fail (printf "%s: both credsSecret.name (%q) and userSecret.name (%q) are set; a NATS client logs in with one identity: keep the .creds file or the user/password and set the other name to \"\"" $where $creds.name $user.name) -}}
{{- end -}}
where: {{ $where | quote }}
{{- if $creds.name }}
kind: creds
secret: {{ $creds.name | quote }}
key: {{ $creds.key | default "nats.creds" | quote }}
{{- else if $user.name }}
kind: user
secret: {{ $user.name | quote }}
userKey: {{ $user.userKey | default "user" | quote }}
passwordKey: {{ $user.passwordKey | default "password" | quote }}
{{- else }}
kind: none
{{- end }}
{{- end -}}

{{/* NATS: what workers need too; `id` is the pod's identity from mljob.natsIdentity. */}}
{{- define "mljob.natsEnv" -}}
{{- $root := .root -}}
{{ include "mljob.connEnv" (dict "env" "MLJOB_NATS_URL" "conn" $root.Values.nats "field" "url") }}
{{- if $root.Values.nats.tls.caSecret.name }}
- name: MLJOB_NATS_TLS_CA_FILE
  value: /etc/mljob/tls/nats/{{ $root.Values.nats.tls.caSecret.key }}
{{- end }}
{{- if eq .id.kind "creds" }}
- name: MLJOB_NATS_CREDS_FILE
  value: /etc/mljob/nats-creds/nats.creds
{{- else if eq .id.kind "user" }}
- name: MLJOB_NATS_USER
  valueFrom:
    secretKeyRef:
      name: {{ .id.secret }}
      key: {{ .id.userKey }}
- name: MLJOB_NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .id.secret }}
      key: {{ .id.passwordKey }}
{{- end }}
{{- end -}}

{{/* The .creds file of the pod's NATS identity, read-only at a fixed path. 0400 plus the pod's
fsGroup: the kubelet makes the file root:<fsGroup> 0440, readable by the pod's user. */}}
{{- define "mljob.natsCredsVolume" -}}
{{- if eq .id.kind "creds" -}}
- name: nats-creds
  secret:
    secretName: {{ .id.secret }}
    defaultMode: 0400
    items:
      - key: {{ .id.key }}
        path: nats.creds
{{- end }}
{{- end -}}

{{- define "mljob.natsCredsMount" -}}
{{- if eq .id.kind "creds" -}}
- name: nats-creds
  mountPath: /etc/mljob/nats-creds
  readOnly: true
{{- end }}
{{- end -}}

{{/* Every connection of the operator and the collector, and the settings they share: both
create JetStream streams (the collector the results stream), so both get the replica count, and
both open Redis (workers do neither). */}}
{{- define "mljob.storesEnv" -}}
{{- $root := .root -}}
{{ include "mljob.natsEnv" . }}
- name: MLJOB_STREAM_REPLICAS
  value: {{ $root.Values.nats.streamReplicas | quote }}
{{ include "mljob.connEnv" (dict "env" "MLJOB_REDIS_URL" "conn" $root.Values.redis "field" "url") }}
- name: MLJOB_REDIS_CLUSTER
  value: {{ $root.Values.redis.cluster | quote }}
- name: MLJOB_REDIS_PREFIX
  value: {{ $root.Values.redis.prefix | quote }}
{{- if $root.Values.redis.tls.caSecret.name }}
- name: MLJOB_REDIS_TLS_CA_FILE
  value: /etc/mljob/tls/redis/{{ $root.Values.redis.tls.caSecret.key }}
{{- end }}
{{ include "mljob.connEnv" (dict "env" "MLJOB_POSTGRES_DSN" "conn" $root.Values.postgres "field" "dsn") }}
{{- if $root.Values.postgres.schema }}
- name: MLJOB_POSTGRES_SCHEMA
  value: {{ $root.Values.postgres.schema | quote }}
{{- end }}
{{- if $root.Values.postgres.tls.caSecret.name }}
- name: MLJOB_POSTGRES_TLS_CA_FILE
  value: /etc/mljob/tls/postgres/{{ $root.Values.postgres.tls.caSecret.key }}
{{/* libpq reads these itself, so TLS to Postgres works before the settings model knows the file. */}}
- name: PGSSLROOTCERT
  value: /etc/mljob/tls/postgres/{{ $root.Values.postgres.tls.caSecret.key }}
- name: PGSSLMODE
  value: {{ $root.Values.postgres.tls.sslMode | quote }}
{{- end }}
{{- end -}}

{{/* HOME and TMPDIR on the scratch volume: the root filesystem is read-only. */}}
{{/* The leader Lease: one per release, so two releases in one namespace never share it. */}}
{{- define "mljob.leaseName" -}}
{{- include "mljob.fullname" . -}}
{{- end -}}

{{- define "mljob.runtimeEnv" -}}
- name: MLJOB_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
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
With ha.enabled, a Role in the release namespace (rbac.yaml) for the leader Lease.
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
{{- end -}}

{{/*
The pod's network: the host's with hostNetwork (a node whose stores are on the host's loopback,
like `mljob dev stack up --node`), the cluster's otherwise. Cluster DNS stays first either way.
*/}}
{{- define "mljob.hostNetwork" -}}
{{- if .Values.hostNetwork -}}
hostNetwork: true
dnsPolicy: ClusterFirstWithHostNet
{{- end }}
{{- end }}
