{{/* Names, labels, the image, and the pieces every pod shares. */}}

{{- define "garrison.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every resource; the RayCluster carries it too, and KubeRay names its head Service after it. */}}
{{- define "garrison.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The labels that select the release's pods: the default-deny policy and every allow rule use exactly these. */}}
{{- define "garrison.selectorLabels" -}}
app.kubernetes.io/name: {{ include "garrison.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "garrison.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "garrison.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: garrison
{{- end }}

{{/* Labels of one component's resources; call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "garrison.componentLabels" -}}
{{ include "garrison.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "garrison.componentSelector" -}}
{{ include "garrison.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* A pod template's metadata: the component's labels, the user's pod labels and annotations. */}}
{{- define "garrison.podMetadata" -}}
labels:
  {{- include "garrison.componentLabels" . | nindent 2 }}
  {{- with .extraLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- with .ctx.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  checksum/config: {{ include (print .ctx.Template.BasePath "/configmap.yaml") .ctx | sha256sum }}
  {{- with .ctx.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{- define "garrison.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "garrison.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* <registry>/<repository>:<tag>[@<digest>]: every container of the chart runs this one image. */}}
{{- define "garrison.image" -}}
{{- $image := .Values.image }}
{{- $registry := .Values.global.imageRegistry | trimSuffix "/" }}
{{- $ref := printf "%s:%s" $image.repository $image.tag }}
{{- if $registry }}{{ $ref = printf "%s/%s" $registry $ref }}{{ end }}
{{- if $image.digest }}{{ $ref = printf "%s@%s" $ref $image.digest }}{{ end }}
{{- $ref }}
{{- end }}

{{/* Pod-level settings every pod of the release shares. */}}
{{- define "garrison.podCommon" -}}
serviceAccountName: {{ include "garrison.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Container-level settings every container shares. */}}
{{- define "garrison.containerCommon" -}}
image: {{ include "garrison.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end }}

{{/* The Ray containers' environment: Ray starts its workers (the ranks, the engine cores) at nice 15 unless told
otherwise, under everything else on the node; they are the workload (garrison_workers/worker_group.py, ensure_ray). */}}
{{- define "garrison.rayEnv" -}}
- name: RAY_worker_niceness
  value: "0"
{{ include "garrison.rayAuthEnv" . }}
{{- end }}

{{- define "garrison.rayTokenSecret" -}}
{{- default (printf "%s-ray-token" (include "garrison.fullname" .)) .Values.ray.auth.existingSecret }}
{{- end }}

{{/* Ray's token authentication, for every process of the Ray cluster: its nodes and the drivers that attach to it
(the gateways, the controller). Ray reads the token from RAY_AUTH_TOKEN. */}}
{{- define "garrison.rayAuthEnv" -}}
{{- if .Values.ray.auth.enabled -}}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "garrison.rayTokenSecret" . }}
      key: auth_token
{{- else -}}
- name: RAY_AUTH_MODE
  value: disabled
{{- end }}
{{- end }}

{{/* Writable scratch space under a read-only root filesystem. */}}
{{- define "garrison.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- end }}

{{- define "garrison.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/garrison
{{- end }}

{{- define "garrison.configVolume" -}}
- name: config
  configMap:
    name: {{ include "garrison.fullname" . }}-config
{{- end }}

{{- define "garrison.configMount" -}}
- name: config
  mountPath: /etc/garrison/config.yaml
  subPath: config.yaml
  readOnly: true
{{- end }}

{{/* The store's claim: read-only everywhere except the import Job, which mounts it itself. */}}
{{- define "garrison.storeClaim" -}}
{{- default (printf "%s-store" (include "garrison.fullname" .)) .Values.store.existingClaim }}
{{- end }}

{{- define "garrison.storeVolume" -}}
{{- if .Values.store.enabled -}}
- name: store
  persistentVolumeClaim:
    claimName: {{ include "garrison.storeClaim" . }}
    readOnly: true
{{- end }}
{{- end }}

{{- define "garrison.storeMount" -}}
{{- if .Values.store.enabled -}}
- name: store
  mountPath: {{ .Values.store.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "garrison.kekSecret" -}}
{{- default (printf "%s-kek" (include "garrison.fullname" .)) .Values.kek.existingSecret }}
{{- end }}

{{/* The KEK Secret as a directory (config kek_secret_dir); 0440 so the pod's fsGroup can read it. */}}
{{- define "garrison.kekVolume" -}}
- name: kek
  secret:
    secretName: {{ include "garrison.kekSecret" . }}
    defaultMode: 0440
    items:
      - key: kek
        path: kek
{{- end }}

{{- define "garrison.kekMount" -}}
- name: kek
  mountPath: /etc/garrison/kek
  readOnly: true
{{- end }}

{{/* Ray's address for the controller and the gateways: KubeRay's head Service, Ray client port. */}}
{{- define "garrison.rayAddress" -}}
{{- printf "ray://%s-head-svc.%s.svc:10001" (include "garrison.fullname" .) .Release.Namespace }}
{{- end }}

{{/*
The worker groups of every model, as a list of dicts: name (the KubeRay groupName), resource (the custom Ray
resource its pods advertise and its ranks take), and the model and group they come from. One name per model group:
<model>-<role>, with -<n> when a model has more than one group of that role (its decode groups).
*/}}
{{- define "garrison.workerGroups" -}}
{{- $groups := list }}
{{- range $model := .Values.models }}
{{- $seen := dict }}
{{- range $index, $group := $model.groups }}
{{- $count := 0 }}
{{- range $model.groups }}{{ if eq .role $group.role }}{{ $count = add1 $count }}{{ end }}{{ end }}
{{- $ordinal := get $seen $group.role | default 0 | int }}
{{- $_ := set $seen $group.role (add1 $ordinal) }}
{{- $name := printf "%s-%s" $model.name $group.role }}
{{- if gt $count 1 }}{{ $name = printf "%s-%d" $name $ordinal }}{{ end }}
{{- $groups = append $groups (dict "name" $name "resource" (printf "garrison/%s" $name) "model" $model "group" $group "index" $index) }}
{{- end }}
{{- end }}
{{- toJson (dict "groups" $groups) }}
{{- end }}
