{{- define "shotover.tag" -}}{{ .Values.image.tag | default .Chart.AppVersion }}{{- end -}}
{{- define "shotover.operatorImage" -}}
{{- .Values.operator.image | default (printf "%s/shotover-operator:%s" .Values.image.registry (include "shotover.tag" .)) -}}
{{- end -}}
{{- define "shotover.webhookImage" -}}
{{- .Values.webhook.image | default (printf "%s/shotover-webhook:%s" .Values.image.registry (include "shotover.tag" .)) -}}
{{- end -}}
{{- define "shotover.labels" -}}
app.kubernetes.io/part-of: shotover
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "shotover.operator" -}}{{ .Release.Name }}-operator{{- end -}}
{{- define "shotover.webhook" -}}{{ .Release.Name }}-webhook{{- end -}}
{{- define "shotover.webhookConfig" -}}{{ .Release.Name }}-sidecar-injector{{- end -}}
{{- define "shotover.webhookSecret" -}}{{ .Release.Name }}-webhook-tls{{- end -}}
{{- define "shotover.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}
{{- define "shotover.containerSecurityContext" -}}
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
{{/* Spread replicas over nodes and zones (preferred, so a one-node cluster still runs them),
     unless the values give an affinity of their own. Call with (list $ "operator"). */}}
{{- define "shotover.scheduling" -}}
{{- $root := index . 0 }}{{- $component := index . 1 }}
{{- $values := index $root.Values $component }}
{{- $selector := dict "app.kubernetes.io/instance" $root.Release.Name "app.kubernetes.io/component" $component }}
{{- with $values.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
affinity:
{{- if $values.affinity }}
  {{- toYaml $values.affinity | nindent 2 }}
{{- else }}
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels: {{- toYaml $selector | nindent 14 }}
{{- end }}
topologySpreadConstraints:
{{- if $values.topologySpreadConstraints }}
  {{- toYaml $values.topologySpreadConstraints | nindent 2 }}
{{- else }}
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels: {{- toYaml $selector | nindent 8 }}
{{- end }}
{{- end -}}
{{- define "shotover.clientConfig" -}}
{{- if .Values.webhook.url }}
url: {{ .Values.webhook.url }}
{{- else }}
service:
  name: {{ include "shotover.webhook" . }}
  namespace: {{ .Release.Namespace }}
  path: /inject
  port: 443
{{- end }}
{{- end }}
{{- define "shotover.webhookCommon" -}}
clientConfig:
  {{- include "shotover.clientConfig" . | trim | nindent 2 }}
rules:
  - operations: [CREATE]
    apiGroups: [""]
    apiVersions: [v1]
    resources: [pods]
    scope: Namespaced
admissionReviewVersions: [v1]
# The webhook writes Events, except for dry runs.
sideEffects: NoneOnDryRun
failurePolicy: {{ .Values.webhook.failurePolicy }}
timeoutSeconds: {{ .Values.webhook.timeoutSeconds }}
reinvocationPolicy: {{ .Values.webhook.reinvocationPolicy }}
matchPolicy: Equivalent
# Not sent at all: hostNetwork Pods, and Pods already injected.
matchConditions:
  - name: not-host-network
    expression: "!has(object.spec.hostNetwork) || !object.spec.hostNetwork"
  - name: not-injected
    expression: "!has(object.metadata.annotations) || !('shotover.io/status' in object.metadata.annotations)"
{{- end }}
