{{/* Chart name, overridable. */}}
{{- define "mailrelay-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release name plus chart name, unless the release name holds it. */}}
{{- define "mailrelay-operator.fullname" -}}
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

{{- define "mailrelay-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels common to every object of the release. */}}
{{- define "mailrelay-operator.labels" -}}
helm.sh/chart: {{ include "mailrelay-operator.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mailrelay
{{- end }}

{{/* Selector labels of the operator pods. */}}
{{- define "mailrelay-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailrelay-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Selector labels of the bundled Redis. */}}
{{- define "mailrelay-operator.redisSelectorLabels" -}}
app.kubernetes.io/name: redis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: queue-store
{{- end }}

{{/* A label map as the operator's flags take it: k=v,k2=v2 (sorted by key). */}}
{{- define "mailrelay-operator.labelList" -}}
{{- $out := list }}
{{- range $k, $v := . }}
{{- $out = append $out (printf "%s=%s" $k $v) }}
{{- end }}
{{- join "," $out }}
{{- end }}

{{- define "mailrelay-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mailrelay-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the leader Lease (it also names the install in namespace claims). */}}
{{- define "mailrelay-operator.leaseName" -}}
{{- default (include "mailrelay-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/* What the operator may do: exactly the requests its code makes (checked by
operator/tests/it/rbac.rs against recorded requests). As a ClusterRole, or as a Role
in each of watchNamespaces. */}}
{{- define "mailrelay-operator.operatorRules" -}}
# The controllers list and watch MailRelays, SendQuotas and SenderDomains (and
# list them again in reconciles); status is written by server-side apply.
- apiGroups: ["mailrelay.io"]
  resources: ["mailrelays", "sendquotas", "senderdomains"]
  verbs: ["list", "watch"]
- apiGroups: ["mailrelay.io"]
  resources: ["mailrelays/status", "sendquotas/status", "senderdomains/status"]
  verbs: ["patch"]
# Objects a relay is made of, server-side applied (an apply that creates is
# authorized as create too), each read first (get) so that one the relay does
# not own is reported as a Conflict, never taken over. Deployments, ConfigMaps
# and Services are watched (a change by hand is put back).
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch"]
# The relay's NetworkPolicy: applied, and deleted (when it is the relay's own)
# once spec.networkPolicy.enabled turns false.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch", "delete"]
# The autoscaler spec.autoscaling asks for: applied, and deleted when it changes.
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["get", "create", "patch", "delete"]
# TLS, AUTH, Redis and smarthost Secrets are read, never written: watched
# (metadata) to roll relays when they change, read for their values.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
# The Secrets it writes (names vary per object, so resourceNames cannot narrow
# them): each MailRelay's NAME-admin-token, created when missing and rotated or
# trimmed after a rotation's grace period (update, with resourceVersion); the
# DKIM keys it generates for SenderDomains (create; update when the spec asks
# for another kind of key; delete when a rotated key retires, only its own);
# each MailRelay's NAME-dkim key bundle (server-side apply: patch).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create", "update", "patch", "delete"]
# Events on MailRelays and SendQuotas (a repeated one is patched as a series).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# The namespace claim against overlapping installs: only that Lease.
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["create"]
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  resourceNames: ["mailrelay-operator-claim"]
  verbs: ["get", "update"]
{{- end }}

{{/* The operator image: repository:tag (tag defaults to appVersion) or @digest. */}}
{{- define "mailrelay-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The default relay image handed to the operator. */}}
{{- define "mailrelay-operator.relayImage" -}}
{{- printf "%s:%s" .Values.relayImage.repository (default .Chart.AppVersion .Values.relayImage.tag) }}
{{- end }}

{{- define "mailrelay-operator.redisName" -}}
{{- printf "%s-redis" (include "mailrelay-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Secret holding the bundled Redis password: the chart's own, or redis.auth.existingSecret. */}}
{{- define "mailrelay-operator.redisSecretName" -}}
{{- default (include "mailrelay-operator.redisName" .) .Values.redis.auth.existingSecret }}
{{- end }}

{{/*
Bytes in a Kubernetes memory quantity, as digits: `dict "q" QUANTITY "key" "values.path"`.
Accepted: plain bytes (1073741824), decimal suffixes k M G T and binary ones Ki Mi Gi
Ti, with an optional fraction (1.5Gi). Anything else fails naming the key, rather
than giving Redis a maxmemory nobody meant.
*/}}
{{- define "mailrelay-operator.bytes" -}}
{{- $q := .q }}
{{- if or (kindIs "float64" $q) (kindIs "int64" $q) (kindIs "int" $q) }}
{{- /* Numbers from values files arrive as float64; print them without an exponent. */}}
{{- $q = printf "%d" (int64 $q) }}
{{- end }}
{{- $q = toString $q }}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$" $q) }}
{{- fail (printf "%s: %q is not a memory quantity this chart understands (bytes, or a number with k, M, G, T, Ki, Mi, Gi or Ti: 1Gi, 512Mi, 1G, 1073741824)" .key $q) }}
{{- end }}
{{- $num := regexReplaceAll "[A-Za-z]+$" $q "" }}
{{- $suffix := regexReplaceAll "^[0-9.]+" $q "" }}
{{- $mult := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 }}
{{- printf "%d" (mulf (float64 $num) (index $mult $suffix) | floor | int64) }}
{{- end }}

{{/*
maxmemory of the bundled Redis in bytes: redis.maxmemory if set, else 75% of the
container's memory limit. The other 25% is headroom Redis needs beyond its
dataset and that maxmemory does not count: the AOF rewrite runs in a fork whose
copy-on-write pages grow with every write during the rewrite, client and AOF
buffers, and allocator fragmentation. Without maxmemory a full queue ends in an
OOM kill (and a restart replaying the whole AOF) instead of Redis refusing writes,
which relays turn into `451` (clients retry).
*/}}
{{- define "mailrelay-operator.redisMaxmemory" -}}
{{- $r := .Values.redis }}
{{- $limit := "" }}
{{- with $r.resources }}{{ with .limits }}{{ with .memory }}{{ $limit = . }}{{ end }}{{ end }}{{ end }}
{{- if not $limit }}
{{- fail "redis.resources.limits.memory is required with redis.enabled: Redis's maxmemory is derived from it (75%), so that a full queue makes relays answer 451 instead of Redis being OOM-killed" }}
{{- end }}
{{- $limitBytes := include "mailrelay-operator.bytes" (dict "q" $limit "key" "redis.resources.limits.memory") | int64 }}
{{- if lt $limitBytes 67108864 }}
{{- fail (printf "redis.resources.limits.memory: %v is %d bytes; the bundled Redis needs at least 64Mi (did you mean %vMi?)" $limit $limitBytes $limit) }}
{{- end }}
{{- if $r.maxmemory }}
{{- $max := include "mailrelay-operator.bytes" (dict "q" $r.maxmemory "key" "redis.maxmemory") | int64 }}
{{- if ge $max $limitBytes }}
{{- fail (printf "redis.maxmemory (%v) must be below redis.resources.limits.memory (%v): Redis needs headroom above maxmemory for the AOF rewrite and client buffers" $r.maxmemory $limit) }}
{{- end }}
{{- if lt $max 16777216 }}
{{- fail (printf "redis.maxmemory: %v is %d bytes; at least 16Mi" $r.maxmemory $max) }}
{{- end }}
{{- $max }}
{{- else }}
{{- div (mul $limitBytes 3) 4 }}
{{- end }}
{{- end }}

{{/* redis.conf of the bundled Redis: `dict "root" $ "maxmemory" BYTES`. */}}
{{- define "mailrelay-operator.redisConf" -}}
{{- $r := .root.Values.redis -}}
bind * -::*
port 6379
protected-mode no
dir /data
appendonly yes
appendfsync {{ $r.appendfsync }}
aof-use-rdb-preamble yes
# {{ if $r.maxmemory }}redis.maxmemory{{ else }}75% of redis.resources.limits.memory{{ end }}: a full Redis refuses writes (relays answer 451) instead of being OOM-killed
maxmemory {{ .maxmemory }}
maxmemory-policy noeviction
# Small sorted sets and hashes in compact form (listpack) only up to 32 entries, not 128: a
# relay's in-flight mail shares one shard's lease index, and each lease and finish scans a
# listpack that size (docs/operations.md, "Other Redis settings that matter")
zset-max-listpack-entries 32
hash-max-listpack-entries 32
{{- end }}

{{/* The program names of the Redis image: redis-server/-cli or valkey-server/-cli. */}}
{{- define "mailrelay-operator.redisServer" -}}
{{- printf "%s-server" .Values.redis.engine }}
{{- end }}
{{- define "mailrelay-operator.redisCli" -}}
{{- printf "%s-cli" .Values.redis.engine }}
{{- end }}

{{/* The Redis the first MailRelay uses, as the CRD's spec.redis. */}}
{{- define "mailrelay-operator.relayRedis" -}}
{{- if .Values.redis.enabled }}
url: {{ printf "redis://%s.%s.svc:6379" (include "mailrelay-operator.redisName" .) .Release.Namespace | quote }}
{{- if .Values.redis.auth.enabled }}
passwordSecret:
  name: {{ include "mailrelay-operator.redisSecretName" . | quote }}
  key: {{ .Values.redis.auth.secretKey | quote }}
{{- end }}
{{- else }}
{{- $e := .Values.externalRedis }}
{{- if $e.urlSecret.name }}
urlSecret:
  name: {{ $e.urlSecret.name | quote }}
  key: {{ $e.urlSecret.key | quote }}
{{- else }}
url: {{ $e.url | quote }}
{{- end }}
{{- if eq $e.mode "cluster" }}
cluster: true
{{- end }}
{{- with $e.clusterNodes }}
clusterNodes:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .Values.externalRedis.passwordSecret.name }}
passwordSecret:
  name: {{ .Values.externalRedis.passwordSecret.name | quote }}
  key: {{ .Values.externalRedis.passwordSecret.key | quote }}
{{- end }}
{{- if .Values.externalRedis.waitReplicas }}
waitReplicas: {{ .Values.externalRedis.waitReplicas }}
{{- end }}
{{- if .Values.externalRedis.waitTimeout }}
waitTimeout: {{ .Values.externalRedis.waitTimeout | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Cross-field checks the schema cannot phrase clearly. */}}
{{- define "mailrelay-operator.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicaCount > 1 needs leaderElection.enabled=true: two operators reconciling at once would fight over the same objects" }}
{{- end }}
{{- $e := .Values.externalRedis }}
{{- if and $e.url $e.urlSecret.name }}
{{- fail "externalRedis: set either url (inline) or urlSecret.name (the URL from a Secret), not both" }}
{{- end }}
{{- $external := or $e.url $e.urlSecret.name }}
{{- if and .Values.relay.enabled (not .Values.redis.enabled) (not $external) }}
{{- fail "relay.enabled needs a Redis: set redis.enabled=true (bundled, not HA), externalRedis.url or externalRedis.urlSecret.name" }}
{{- end }}
{{- if and .Values.redis.enabled $external }}
{{- fail "set either redis.enabled or externalRedis (url or urlSecret), not both" }}
{{- end }}
{{- $sentinelUrl := or (hasPrefix "redis+sentinel://" $e.url) (hasPrefix "rediss+sentinel://" $e.url) }}
{{- if and (eq $e.mode "sentinel") $e.url (not $sentinelUrl) }}
{{- fail "externalRedis.mode=sentinel needs a redis+sentinel://host1:26379[,host2:26379]/MASTER_NAME url (or rediss+sentinel:// with TLS)" }}
{{- end }}
{{- if and (ne $e.mode "sentinel") $sentinelUrl }}
{{- fail "externalRedis.url is a redis+sentinel:// URL: set externalRedis.mode=sentinel" }}
{{- end }}
{{- if and $e.clusterNodes (ne $e.mode "cluster") }}
{{- fail "externalRedis.clusterNodes needs externalRedis.mode=cluster" }}
{{- end }}
{{- if and .Values.relay.enabled (not .Values.relay.hostname) }}
{{- fail "relay.enabled needs relay.hostname (the relay's EHLO name, e.g. relay.example.com)" }}
{{- end }}
{{- if and .Values.relay.enabled .Values.relay.authSecretName (not .Values.relay.tlsSecretName) }}
{{- fail "relay.authSecretName needs relay.tlsSecretName: SMTP AUTH is offered only over TLS" }}
{{- end }}
{{- range .Values.relay.listeners }}
{{- if and $.Values.relay.enabled (eq (toString .tls) "implicit") (not $.Values.relay.tlsSecretName) }}
{{- fail (printf "relay.listeners %s: tls: implicit needs relay.tlsSecretName (a certificate Secret)" .name) }}
{{- end }}
{{- end }}
{{- $auth := .Values.redis.auth }}
{{- if and .Values.redis.enabled $auth.enabled }}
{{- if and $auth.existingSecret $auth.password }}
{{- fail "redis.auth: set either existingSecret (a Secret you manage) or password (the chart creates the Secret), not both" }}
{{- end }}
{{- if and $auth.generatePassword (or $auth.existingSecret $auth.password) }}
{{- fail "redis.auth.generatePassword=true conflicts with redis.auth.existingSecret / redis.auth.password: the password comes from one place" }}
{{- end }}
{{- end }}
{{- if and .Values.relay.enabled (not (has .Values.relay.service.type .Values.allowedServiceTypes)) }}
{{- fail (printf "relay.service.type %s is not in allowedServiceTypes %v: the operator would refuse the relay (add it to allowedServiceTypes if the platform allows it)" .Values.relay.service.type .Values.allowedServiceTypes) }}
{{- end }}
{{- if .Values.networkPolicy.enabled }}
{{- range .Values.networkPolicy.redis.extraFrom }}
{{- if not (or .podSelector .namespaceSelector .ipBlock) }}
{{- fail "networkPolicy.redis.extraFrom: each entry is a NetworkPolicy peer with podSelector, namespaceSelector or ipBlock ({} would admit every source)" }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.service.enabled=true (the ServiceMonitor scrapes that Service)" }}
{{- end }}
{{- end }}
