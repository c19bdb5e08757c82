{{/* Names, labels and the decisions every template shares. */}}

{{- define "berth.name" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "berth.labels" -}}
app.kubernetes.io/name: berth
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "berth.selector" -}}
app.kubernetes.io/name: berth
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "berth.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "berth.configSecret" -}}
{{- .Values.existingConfigSecret | default (printf "%s-config" (include "berth.name" .)) -}}
{{- end -}}

{{/* The backend types the config names ("" when an existing Secret holds the config). */}}
{{- define "berth.types" -}}
{{- $types := list -}}
{{- range $name, $backend := .Values.config.backends -}}
{{- $types = append $types (required (printf "config.backends.%s.type is required" $name) $backend.type) -}}
{{- end -}}
{{- $types | uniq | sortAlpha | join "," -}}
{{- end -}}

{{/* "true" when the CSIDriver must say attachRequired (a backend of a type that attaches). */}}
{{- define "berth.attach" -}}
{{- $mode := toString .Values.csiDriver.attachRequired -}}
{{- if and (eq $mode "auto") .Values.existingConfigSecret -}}
{{- fail "existingConfigSecret: the chart cannot read that Secret, so set csiDriver.attachRequired to true (nfs, rbd, cinder backends) or false (hostpath only)" -}}
{{- end -}}
{{- if eq $mode "auto" -}}
{{- $types := splitList "," (include "berth.types" .) -}}
{{- if or (has "nfs" $types) (has "rbd" $types) (has "cinder" $types) -}}true{{- else -}}false{{- end -}}
{{- else if or (eq $mode "true") (eq $mode "false") -}}
{{- $mode -}}
{{- else -}}
{{- fail "csiDriver.attachRequired must be auto, true or false" -}}
{{- end -}}
{{- end -}}

{{/* A release is either node-local (hostPath only) or shared (no hostPath): one driver name
     cannot have both a provisioner per node and a central one. */}}
{{- define "berth.checkMode" -}}
{{- if not .Values.existingConfigSecret -}}
{{- if not .Values.config.backends -}}
{{- fail "config.backends is empty: configure at least one backend (see examples/)" -}}
{{- end -}}
{{- $types := splitList "," (include "berth.types" .) -}}
{{- if and .Values.nodeLocal (or (has "nfs" $types) (has "rbd" $types) (has "cinder" $types) (has "cephfs" $types)) -}}
{{- fail "nodeLocal: true serves hostpath backends only; put nfs, rbd, cinder and cephfs backends in a release of their own" -}}
{{- end -}}
{{- include "berth.checkHostpathPaths" . -}}
{{- if and (not .Values.nodeLocal) (has "hostpath" $types) -}}
{{- fail "hostpath volumes live on each node: install them in a release of their own with nodeLocal: true and another driverName (see examples/hostpath.yaml)" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Where kubelet finds the node plugin's socket. */}}
{{- define "berth.pluginDir" -}}
{{ .Values.kubeletDir }}/plugins/{{ .Values.driverName }}
{{- end -}}

{{/* Sidecars: restricted, read-only root, no capabilities. */}}
{{- define "berth.sidecarSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* The node plugin's sidecars: not root, but in group 0, which owns the root driver's 0660
     socket. */}}
{{- define "berth.nodeSidecarSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 0
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "berth.secretMounts" -}}
{{- range .Values.secretMounts }}
- name: secret-{{ .name }}
  mountPath: {{ .mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Read by the controller's group (fsGroup 10001) and by root on the nodes. */}}
{{- define "berth.secretVolumes" -}}
{{- range .Values.secretMounts }}
- name: secret-{{ .name }}
  secret:
    secretName: {{ .name }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{/* hostPath backends keep their volumes under /var/lib/berth, which the node plugin mounts
     (Bidirectional): a mount of their own nested in it would leak onto the host. */}}
{{- define "berth.checkHostpathPaths" -}}
{{- range $name, $b := .Values.config.backends }}
{{- if and (eq $b.type "hostpath") (not (hasPrefix "/var/lib/berth/" (printf "%s/" (required (printf "config.backends.%s.path is required" $name) $b.path)))) }}
{{- fail (printf "config.backends.%s.path must lie under /var/lib/berth (the node plugin's state directory), not %s" $name $b.path) }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Changed block tracking (snapshotMetadata): the sidecar's Service, its TLS Secret, the audience. */}}
{{- define "berth.snapshotMetadataService" -}}
{{ include "berth.name" . }}-snapshot-metadata
{{- end -}}

{{- define "berth.snapshotMetadataSecret" -}}
{{- .Values.snapshotMetadata.tls.secretName | default (printf "%s-snapshot-metadata-tls" (include "berth.name" .)) -}}
{{- end -}}

{{- define "berth.snapshotMetadataAudience" -}}
{{- .Values.snapshotMetadata.audience | default .Values.driverName -}}
{{- end -}}

{{/* The sidecar asks the controller for changed blocks, which only rbd backends track in a shared
     release. A node-local release has no controller: every node serves its own hostPath
     snapshots, while a SnapshotMetadataService gives backup clients one address per driver. */}}
{{- define "berth.checkSnapshotMetadata" -}}
{{- $smd := .Values.snapshotMetadata -}}
{{- if $smd.enabled -}}
{{- if .Values.nodeLocal -}}
{{- fail "snapshotMetadata.enabled: a nodeLocal release has no controller to run the sidecar in; each node serves only its own hostPath snapshots, and a SnapshotMetadataService gives backup clients one address for the whole driver, which cannot reach the node holding a snapshot" -}}
{{- end -}}
{{- if not .Values.sidecars.snapshotter.enabled -}}
{{- fail "snapshotMetadata.enabled needs sidecars.snapshotter.enabled: it serves the blocks of this driver's VolumeSnapshots" -}}
{{- end -}}
{{- if and (not .Values.existingConfigSecret) (not (has "rbd" (splitList "," (include "berth.types" .)))) -}}
{{- fail "snapshotMetadata.enabled: no configured backend tracks changed blocks (rbd does; nfs, cephfs and cinder do not), so the controller does not offer the SnapshotMetadata service and the sidecar would exit" -}}
{{- end -}}
{{- if and $smd.tls.secretName (not $smd.tls.caCert) -}}
{{- fail "snapshotMetadata.tls.secretName: set snapshotMetadata.tls.caCert to the PEM CA bundle that signed its certificate (--set-file snapshotMetadata.tls.caCert=ca.pem); the SnapshotMetadataService hands it to backup clients" -}}
{{- end -}}
{{- $ports := list (int $smd.port) (int $smd.httpPort) -}}
{{- if .Values.metrics.enabled -}}{{- $ports = append $ports (int .Values.metrics.port) -}}{{- end -}}
{{- if .Values.sidecars.livenessprobe.enabled -}}{{- $ports = append $ports (int .Values.sidecars.livenessprobe.controllerPort) -}}{{- end -}}
{{- if ne (len $ports) (len (uniq $ports)) -}}
{{- fail (printf "snapshotMetadata.port and httpPort must differ from each other and from the controller pod's other ports (metrics.port, sidecars.livenessprobe.controllerPort): %v" $ports) -}}
{{- end -}}
{{- end -}}
{{- end -}}
