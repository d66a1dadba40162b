{{/* Names and labels */}}
{{- define "dotmac-sidecar.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dotmac-sidecar.injector" -}}
{{- printf "%s-injector" (include "dotmac-sidecar.fullname" .) -}}
{{- end -}}

{{- define "dotmac-sidecar.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "dotmac-sidecar.injectorSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: injector
{{- end -}}

{{/*
Static injection, for charts that include this one (no webhook needed):

  initContainers:
    {{- include "dotmac-sidecar.container" $ctx | nindent 4 }}
  volumes:
    {{- include "dotmac-sidecar.volumes" $ctx | nindent 4 }}

with $ctx = dict "sidecar" (index .Values "dotmac-sidecar" "sidecar")
                 "upstreamPort" 8080 "policyConfigMap" "orders-policy"
                 "configConfigMap" "orders-sidecar" "vaultRole" "orders"
(each key but "sidecar" optional: the sidecar values give the default). Name the app's
port `http-app`; the sidecar takes `http`. The webhook builds the same container and
volumes (sidecar/k8s/inject.py); a test holds the two together.
*/}}
{{- define "dotmac-sidecar.inputs" -}}
{{- $s := .sidecar -}}
{{- $upstream := $s.upstreamPort -}}
{{- if hasKey . "upstreamPort" }}{{ $upstream = .upstreamPort }}{{ end -}}
{{- $policy := $s.policyConfigMap -}}
{{- if hasKey . "policyConfigMap" }}{{ $policy = .policyConfigMap }}{{ end -}}
{{- $config := $s.configConfigMap | default "" -}}
{{- if hasKey . "configConfigMap" }}{{ $config = .configConfigMap }}{{ end -}}
{{- $role := $s.vaultRole | default "" -}}
{{- if hasKey . "vaultRole" }}{{ $role = .vaultRole }}{{ end -}}
{{- if or (eq (int $upstream) (int $s.listenPort)) (eq (int $upstream) (int $s.adminPort)) -}}
{{- fail (printf "dotmac-sidecar: the app's port %d is one the sidecar takes; move the app to another port" (int $upstream)) -}}
{{- end -}}
{{- dict "upstreamPort" (int $upstream) "policyConfigMap" $policy "configConfigMap" $config "vaultRole" $role | toJson -}}
{{- end -}}

{{- define "dotmac-sidecar.container" -}}
{{- $s := .sidecar -}}
{{- $in := include "dotmac-sidecar.inputs" . | fromJson -}}
{{- $args := list -}}
{{- if $in.configConfigMap -}}
{{- $args = concat $args (list "--config" "/etc/dotmac/config/sidecar.yaml") -}}
{{- end -}}
{{- $args = concat $args (list "--listen" (printf "0.0.0.0:%d" (int $s.listenPort)) "--admin-listen" (printf "0.0.0.0:%d" (int $s.adminPort)) "--upstream" (printf "http://127.0.0.1:%d" (int $in.upstreamPort)) "--policy" "/etc/dotmac/policies") -}}
{{- $env := list (dict "name" "DOTMAC_LOG_LEVEL" "value" ($s.logLevel | default "INFO")) -}}
{{- if $in.vaultRole -}}
{{- $env = append $env (dict "name" "DOTMAC_VAULT_ROLE" "value" $in.vaultRole) -}}
{{- end -}}
{{- $mounts := list (dict "name" "dotmac-policy" "mountPath" "/etc/dotmac/policies" "readOnly" true) -}}
{{- if $in.configConfigMap -}}
{{- $mounts = append $mounts (dict "name" "dotmac-config" "mountPath" "/etc/dotmac/config" "readOnly" true) -}}
{{- end -}}
{{- $mounts = concat $mounts (list (dict "name" "dotmac-tmp" "mountPath" "/tmp") (dict "name" "dotmac-secrets" "mountPath" "/run/secrets/dotmac")) -}}
{{- $uid := int ($s.runAsUser | default 10001) -}}
{{- $container := dict
      "name" "dotmac-sidecar"
      "image" (printf "%s:%s" $s.image.repository $s.image.tag)
      "imagePullPolicy" ($s.image.pullPolicy | default "IfNotPresent")
      "restartPolicy" "Always"
      "args" $args
      "env" $env
      "ports" (list (dict "name" "http" "containerPort" (int $s.listenPort) "protocol" "TCP") (dict "name" "dotmac-admin" "containerPort" (int $s.adminPort) "protocol" "TCP"))
      "startupProbe" (dict "httpGet" (dict "path" "/readyz" "port" "dotmac-admin") "periodSeconds" 1 "timeoutSeconds" 1 "failureThreshold" 120)
      "readinessProbe" (dict "httpGet" (dict "path" "/readyz" "port" "dotmac-admin") "periodSeconds" 5 "timeoutSeconds" 1 "failureThreshold" 3)
      "livenessProbe" (dict "httpGet" (dict "path" "/healthz" "port" "dotmac-admin") "periodSeconds" 10 "timeoutSeconds" 1 "failureThreshold" 3)
      "resources" $s.resources
      "securityContext" (dict "runAsNonRoot" true "runAsUser" $uid "runAsGroup" $uid "readOnlyRootFilesystem" true "allowPrivilegeEscalation" false "capabilities" (dict "drop" (list "ALL")) "seccompProfile" (dict "type" "RuntimeDefault"))
      "volumeMounts" $mounts -}}
{{- list $container | toYaml -}}
{{- end -}}

{{- define "dotmac-sidecar.volumes" -}}
{{- $in := include "dotmac-sidecar.inputs" . | fromJson -}}
{{- $volumes := list (dict "name" "dotmac-policy" "configMap" (dict "name" $in.policyConfigMap)) -}}
{{- if $in.configConfigMap -}}
{{- $volumes = append $volumes (dict "name" "dotmac-config" "configMap" (dict "name" $in.configConfigMap)) -}}
{{- end -}}
{{- $volumes = concat $volumes (list (dict "name" "dotmac-tmp" "emptyDir" (dict "medium" "Memory" "sizeLimit" "16Mi")) (dict "name" "dotmac-secrets" "emptyDir" (dict "medium" "Memory" "sizeLimit" "1Mi"))) -}}
{{- $volumes | toYaml -}}
{{- end -}}
