{{/* Names, labels and the pieces every pod of the chart shares. */}}

{{- define "sa.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sa.fullname" -}}
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

{{/* A component's object name: <fullname>-<component>, within 63 characters. */}}
{{- define "sa.component" -}}
{{- printf "%s-%s" (include "sa.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-") .component -}}
{{- end -}}

{{- define "sa.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sa.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "sa.labels" -}}
{{ include "sa.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: sensor-anomaly
{{- end -}}

{{/* image: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "sa.image" -}}
{{- $img := index .root.Values.image .which -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .root.Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{- define "sa.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sa.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "sa.modelClaim" -}}
{{- default (include "sa.component" (dict "root" . "component" "models")) .Values.model.persistence.existingClaim -}}
{{- end -}}

{{/* The worker's config file: chart defaults, then .Values.worker.config over them. */}}
{{- define "sa.workerConfig" -}}
{{- $kafka := dict
      "bootstrap_servers" .Values.kafka.bootstrapServers
      "security_protocol" .Values.kafka.securityProtocol
      "auto_offset_reset" .Values.keda.offsetResetPolicy -}}
{{- if .Values.kafka.sasl.mechanism -}}
{{- $_ := set $kafka "sasl_mechanism" .Values.kafka.sasl.mechanism -}}
{{- end -}}
{{- if .Values.kafka.tls.existingSecret -}}
{{- $_ := set $kafka "ssl_cafile" (printf "/etc/sensor-anomaly/tls/%s" .Values.kafka.tls.caKey) -}}
{{- $_ := set $kafka "ssl_check_hostname" .Values.kafka.tls.checkHostname -}}
{{- if .Values.kafka.tls.certKey -}}
{{- $_ := set $kafka "ssl_certfile" (printf "/etc/sensor-anomaly/tls/%s" .Values.kafka.tls.certKey) -}}
{{- $_ := set $kafka "ssl_keyfile" (printf "/etc/sensor-anomaly/tls/%s" .Values.kafka.tls.keyKey) -}}
{{- end -}}
{{- end -}}
{{- $defaults := dict
      "kafka" $kafka
      "model" (dict "registry" .Values.model.registryPath "name" .Values.model.name "reload_interval_s" .Values.model.reloadIntervalSeconds)
      "http" (dict "host" "0.0.0.0" "port" .Values.worker.port) -}}
{{- toYaml (mergeOverwrite $defaults (deepCopy .Values.worker.config)) -}}
{{- end -}}

{{- define "sa.serveConfig" -}}
{{- $serve := dict
      "host" "0.0.0.0"
      "port" .Values.serve.port
      "registry" .Values.model.registryPath
      "models" (list .Values.model.name)
      "reload_interval_s" .Values.model.reloadIntervalSeconds -}}
{{- if .Values.serve.tokenSecret.existingSecret -}}
{{- $_ := set $serve "token_env" "SENSOR_ANOMALY_SERVE_TOKEN" -}}
{{- end -}}
{{- toYaml (mergeOverwrite (dict "serve" $serve) (deepCopy .Values.serve.config)) -}}
{{- end -}}

{{- define "sa.trainerConfig" -}}
{{- $cfg := deepCopy .Values.trainer.config -}}
{{- $data := default dict $cfg.data -}}
{{- if eq (toString $data.format) "kafka" -}}
{{- $replay := default dict $data.kafka -}}
{{- $_ := set $replay "bootstrap" .Values.kafka.bootstrapServers -}}
{{- $_ := set $data "kafka" $replay -}}
{{- end -}}
{{- $_ := set $cfg "data" $data -}}
{{- toYaml (mergeOverwrite $cfg (dict "registry" .Values.model.registryPath "name" .Values.model.name)) -}}
{{- end -}}

{{/* Environment for the Kafka secrets: the worker reads them from here only. */}}
{{- define "sa.kafkaSecretEnv" -}}
{{- with .Values.kafka.sasl.existingSecret }}
- name: SENSOR_ANOMALY_KAFKA__SASL_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $.Values.kafka.sasl.usernameKey | quote }}}
- name: SENSOR_ANOMALY_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $.Values.kafka.sasl.passwordKey | quote }}}
{{- end }}
{{- if and .Values.kafka.tls.existingSecret .Values.kafka.tls.keyPasswordKey }}
- name: SENSOR_ANOMALY_KAFKA__SSL_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ .Values.kafka.tls.existingSecret | quote }}, key: {{ .Values.kafka.tls.keyPasswordKey | quote }}}
{{- end }}
{{- end -}}

{{/* Volumes: /tmp (the root filesystem is read-only), config, models, TLS. */}}
{{- define "sa.volumes" -}}
- name: tmp
  emptyDir: {sizeLimit: {{ .tmpSize | default "64Mi" }}}
- name: config
  configMap:
    name: {{ include "sa.component" (dict "root" .root "component" "config") }}
{{- if eq .root.Values.model.source "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "sa.modelClaim" .root }}
    readOnly: {{ .readOnlyModels }}
{{- end }}
{{- if .root.Values.kafka.tls.existingSecret }}
- name: kafka-tls
  secret:
    secretName: {{ .root.Values.kafka.tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "sa.volumeMounts" -}}
- {name: tmp, mountPath: /tmp}
- name: config
  mountPath: /etc/sensor-anomaly/{{ .file }}
  subPath: {{ .file }}
  readOnly: true
{{- if eq .root.Values.model.source "pvc" }}
- name: models
  mountPath: {{ .root.Values.model.registryPath }}
  readOnly: {{ .readOnlyModels }}
{{- end }}
{{- if .root.Values.kafka.tls.existingSecret }}
- {name: kafka-tls, mountPath: /etc/sensor-anomaly/tls, readOnly: true}
{{- end }}
{{- end -}}

{{/* Restart pods when their config changes. */}}
{{- define "sa.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end -}}

{{/*
initContainer (model.source=pvc): wait until the trainer has published a first model
(<registry>/<name>/CURRENT), so a fresh install does not crash-loop the workers, which
exit 2 on a missing model by design. Same image, same security context.
*/}}
{{- define "sa.waitForModel" -}}
{{- if eq .Values.model.source "pvc" }}
initContainers:
  - name: wait-for-model
    image: {{ include "sa.image" (dict "root" . "which" "worker") | quote }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command:
      - sh
      - -c
      - >-
        until [ -s "$0/$1/CURRENT" ]; do
        echo "waiting for the trainer to publish model $1 in $0 (CURRENT)"; sleep 10; done
      - {{ .Values.model.registryPath | quote }}
      - {{ .Values.model.name | quote }}
    resources:
      requests: {cpu: 10m, memory: 16Mi}
      limits: {cpu: 100m, memory: 64Mi}
    securityContext:
      {{- toYaml .Values.securityContext | nindent 6 }}
    volumeMounts:
      - {name: models, mountPath: {{ .Values.model.registryPath | quote }}, readOnly: true}
{{- end }}
{{- end -}}
