{{/*
Cross-field checks the values schema cannot express. Each fails the render with one line
saying what is wrong and how to fix it (helm install/template/lint all stop on it).
*/}}
{{- define "sa.validate" -}}
{{- $v := .Values -}}
{{- if and $v.keda.enabled (gt (int $v.keda.maxReplicaCount) (int $v.kafka.inputPartitions)) -}}
{{- fail (printf "keda.maxReplicaCount (%d) is above kafka.inputPartitions (%d): a worker beyond one per partition gets no partition and sits idle; lower keda.maxReplicaCount or add partitions and raise kafka.inputPartitions" (int $v.keda.maxReplicaCount) (int $v.kafka.inputPartitions)) -}}
{{- end -}}
{{- if and $v.keda.enabled (gt (int $v.keda.minReplicaCount) (int $v.keda.maxReplicaCount)) -}}
{{- fail (printf "keda.minReplicaCount (%d) is above keda.maxReplicaCount (%d)" (int $v.keda.minReplicaCount) (int $v.keda.maxReplicaCount)) -}}
{{- end -}}
{{- if and (not $v.keda.enabled) (gt (int $v.worker.replicas) (int $v.kafka.inputPartitions)) -}}
{{- fail (printf "worker.replicas (%d) is above kafka.inputPartitions (%d): extra workers would sit idle" (int $v.worker.replicas) (int $v.kafka.inputPartitions)) -}}
{{- end -}}
{{- if le (int $v.worker.terminationGracePeriodSeconds) (int $v.worker.stopBoundSeconds) -}}
{{- fail (printf "worker.terminationGracePeriodSeconds (%d) must be above worker.stopBoundSeconds (%d), the worker's own shutdown bound, or Kubernetes kills it before its final commit" (int $v.worker.terminationGracePeriodSeconds) (int $v.worker.stopBoundSeconds)) -}}
{{- end -}}
{{- if not (has $v.model.source (list "pvc" "image")) -}}
{{- fail (printf "model.source must be pvc or image, not %q" $v.model.source) -}}
{{- end -}}
{{- if and (eq $v.model.source "image") (or $v.trainer.job.enabled $v.trainer.cronJob.enabled) -}}
{{- fail "model.source=image bakes the registry into the worker image: the trainer Job/CronJob has nowhere to write; set trainer.job.enabled=false and trainer.cronJob.enabled=false (train elsewhere, build the image) or use model.source=pvc" -}}
{{- end -}}
{{- if and (hasPrefix "SASL" $v.kafka.securityProtocol) (not $v.kafka.sasl.existingSecret) -}}
{{- fail (printf "kafka.securityProtocol=%s needs kafka.sasl.existingSecret (a Secret with the SASL username and password keys)" $v.kafka.securityProtocol) -}}
{{- end -}}
{{- if and (hasPrefix "SASL" $v.kafka.securityProtocol) (not $v.kafka.sasl.mechanism) -}}
{{- fail "kafka.sasl.mechanism is empty: set PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512" -}}
{{- end -}}
{{- if and $v.kafka.tls.certKey (not $v.kafka.tls.keyKey) -}}
{{- fail "kafka.tls.certKey is set without kafka.tls.keyKey: mutual TLS needs both" -}}
{{- end -}}
{{- range $section := list "kafka" -}}
{{- range $key := list "sasl_password" "ssl_password" -}}
{{- if hasKey (default dict (index $v.worker.config $section)) $key -}}
{{- fail (printf "worker.config.%s.%s: secrets are not values (they would land in a ConfigMap); put it in a Secret and set kafka.sasl.existingSecret / kafka.tls.keyPasswordKey" $section $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
