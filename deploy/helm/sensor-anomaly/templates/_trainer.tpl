{{/* The trainer's pod template, shared by the Job and the CronJob. */}}
{{- define "sa.trainerPod" -}}
{{- $c := dict "root" . "component" "trainer" -}}
metadata:
  labels:
    {{- include "sa.labels" $c | nindent 4 }}
  annotations:
    {{- include "sa.configChecksum" . | nindent 4 }}
spec:
  restartPolicy: Never
  serviceAccountName: {{ include "sa.serviceAccountName" . }}
  automountServiceAccountToken: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: trainer
      image: {{ include "sa.image" (dict "root" . "which" "trainer") | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: ["anomaly-train", "--config", "/etc/sensor-anomaly/trainer.yaml"]
      env:
        # The root filesystem is read-only: Keras and matplotlib keep their caches in /tmp.
        - {name: KERAS_HOME, value: /tmp/keras}
        - {name: MPLCONFIGDIR, value: /tmp/matplotlib}
        - {name: HOME, value: /tmp}
        {{- with .Values.trainer.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      resources:
        {{- toYaml .Values.trainer.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        {{- include "sa.volumeMounts" (dict "root" . "file" "trainer.yaml" "readOnlyModels" false) | nindent 8 }}
  volumes:
    {{- include "sa.volumes" (dict "root" . "readOnlyModels" false "tmpSize" "2Gi") | nindent 4 }}
  {{- with .Values.trainer.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.trainer.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.trainer.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
