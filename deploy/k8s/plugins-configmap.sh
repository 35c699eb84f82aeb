#!/usr/bin/env bash
# Turns a directory of .wasm component plugins into the ConfigMap the Deployment mounts at
# /plugins. File names are kept (they set the chain order); bytes go in binaryData.
#
#   deploy/k8s/plugins-configmap.sh DIR [NAME] > plugins-configmap.yaml
#   kubectl apply -f plugins-configmap.yaml     # running pods reload within seconds
#
# A ConfigMap holds at most 1 MiB in all; larger plugins (JavaScript, Python) belong in an image
# volume or an init container: see deploy/k8s/image-volume/.
set -euo pipefail
dir=${1:?usage: plugins-configmap.sh DIR [NAME]}
name=${2:-wasm-extproc-plugins}
shopt -s nullglob
files=("$dir"/*.wasm)
if [ ${#files[@]} -eq 0 ]; then
    echo "plugins-configmap.sh: no .wasm files in $dir" >&2
    exit 1
fi
total=0
echo "apiVersion: v1"
echo "kind: ConfigMap"
echo "metadata:"
echo "  name: $name"
echo "binaryData:"
for file in "${files[@]}"; do
    key=$(basename "$file")
    if ! [[ $key =~ ^[-._a-zA-Z0-9]+$ ]]; then
        echo "plugins-configmap.sh: $key is not a valid ConfigMap key" >&2
        exit 1
    fi
    total=$((total + $(stat -c %s "$file")))
    echo "  $key: $(base64 -w0 "$file")"
done
if [ "$total" -gt 1048576 ]; then
    echo "plugins-configmap.sh: $total bytes of plugins exceed a ConfigMap's 1 MiB; use an image volume" >&2
    exit 1
fi
