"""Every deploy/ artifact, validated by a real tool.

Run by `cargo xtask test` (which installs the tools into target/tools and builds the image's
contents with deploy/build.sh into target/image first):

- Envoy configurations: `envoy --mode validate` (Envoy 1.40), the standalone configs and the
  EnvoyFilter patches embedded into a bootstrap; the in-process ones load the module (built by
  `cargo build --release -p wasm-extproc-module`) and the image's plugins;
- Kubernetes manifests: kubernetes-validate (the Kubernetes OpenAPI schemas, offline) and
  `kubectl kustomize` rendering the base and the image-volume variant;
- the Istio EnvoyFilters, DestinationRule and AuthorizationPolicy and the Envoy Gateway
  EnvoyExtensionPolicies: the CRD schemas Istio and Envoy Gateway publish (npm @kubernetes-models),
  plus the guide's fields one by one;
- per-route chains: the routes each file sets up, the same chain settings in each, the Istio
  route patches merged into a bootstrap's routes and validated by Envoy;
- who may talk to the host: the NetworkPolicy, the Services and the AuthorizationPolicy select
  the rendered Deployment's pods and name its container ports;
- the ConfigMap script: its output round-trips the plugin bytes exactly;
- dashboards and alerts: `promtool check rules` and `promtool test rules` on the alerting rules,
  the PrometheusRule generated from them (its structure, not the operator's CRD schema: no pinned
  package carries it), the Grafana dashboard's queries parsed by promtool, and every metric and
  label they name listed in deploy/monitoring/metrics.txt and the README's Metrics table;
- the Dockerfile: runs deploy/build.sh, non-root, and what deploy/build.sh made is complete
  and passes `wasm-extproc check`.
"""

import base64
import copy
import json
import os
import pathlib
import re
import shutil
import subprocess
import tomllib

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
TOOLS = TARGET / "tools"
DIST = TARGET / "image"
ENVOY = os.environ.get("ENVOY_BIN", str(TOOLS / "envoy" / "bin" / "envoy"))
KUBERNETES_VERSION = "1.31.0"
EXT_PROC_CLUSTER = "outbound|9002||ext-proc.default.svc.cluster.local"


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def envoy_validate(config_text, tmp_path, name="envoy.yaml", env=None):
    path = tmp_path / name
    path.write_text(config_text)
    result = subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr
    return result.stdout + result.stderr


# The in-process module as `cargo xtask test` builds it, and the plugins deploy/build.sh made.
MODULE = TARGET / "release" / "libwasm_extproc_module.so"


def with_test_plugins(config_text, plugins_dir, tmp_path):
    """`config_text` with its module settings' plugins_dir pointed at a copy of the image's
    plugins (validation loads them, as Envoy would at start)."""
    plugins = tmp_path / "plugins"
    shutil.copytree(DIST / "plugins", plugins)
    line = f'plugins_dir = "{plugins_dir}"'
    assert config_text.count(line) == 1, line
    return config_text.replace(line, f'plugins_dir = "{plugins}"')


def test_the_in_process_envoy_config_validates_and_loads_the_plugins(tmp_path):
    text = with_test_plugins(
        (DEPLOY / "envoy" / "envoy-in-process.yaml").read_text(), "/plugins", tmp_path
    )
    envoy_validate(text, tmp_path, env={"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(MODULE.parent)})
    # Validation runs the module: a plugins directory it cannot load fails it.
    broken = text.replace(str(tmp_path / "plugins"), str(tmp_path / "nowhere"))
    with pytest.raises(AssertionError, match="plugins directory"):
        envoy_validate(
            broken, tmp_path, env={"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(MODULE.parent)}
        )


def test_the_in_process_envoyfilter_patch_validates_inside_a_bootstrap(tmp_path):
    (envoy_filter,) = load_all(DEPLOY / "istio" / "envoyfilter-in-process.yaml")
    (patch,) = envoy_filter["spec"]["configPatches"]
    assert patch["match"]["context"] == "SIDECAR_INBOUND"
    assert patch["match"]["listener"]["portNumber"] == 80
    assert patch["patch"]["operation"] == "INSERT_BEFORE"
    value = copy.deepcopy(patch["patch"]["value"])
    config = value["typed_config"]
    module = config["dynamic_module_config"]
    assert module["do_not_close"] is True
    assert module["module"]["local"]["filename"].endswith("/libwasm_extproc_module.so")
    module["module"]["local"]["filename"] = str(MODULE)
    config["filter_config"]["value"] = with_test_plugins(
        config["filter_config"]["value"], "/etc/wasm-extproc/plugins", tmp_path
    )
    bootstrap = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
    manager = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    manager["typed_config"]["http_filters"][0] = value
    envoy_validate(yaml.safe_dump(bootstrap), tmp_path)


def test_the_standalone_envoy_config_validates(tmp_path):
    envoy_validate((DEPLOY / "envoy" / "envoy.yaml").read_text(), tmp_path)


def bootstrap_with(patch_value, cluster_name):
    """deploy/envoy/envoy.yaml with its ext_proc filter replaced by `patch_value`, and the
    cluster the patch names added, as Istio would have it."""
    return yaml.safe_dump(bootstrap_dict_with(patch_value, cluster_name))


def bootstrap_dict_with(patch_value, cluster_name):
    """What `bootstrap_with` writes, as a dict to change further."""
    bootstrap = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
    manager = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = manager["typed_config"]["http_filters"]
    assert [f["name"] for f in filters] == [
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.router",
    ]
    filters[0] = patch_value
    cluster = copy.deepcopy(
        next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "ext_proc")
    )
    cluster["name"] = cluster_name
    cluster["load_assignment"]["cluster_name"] = cluster_name
    bootstrap["static_resources"]["clusters"].append(cluster)
    return bootstrap


@pytest.mark.parametrize("file", ["envoyfilter.yaml", "envoyfilter-gateway.yaml"])
def test_envoyfilter_patches_validate_inside_a_bootstrap(file, tmp_path):
    (envoy_filter,) = load_all(DEPLOY / "istio" / file)
    (patch,) = envoy_filter["spec"]["configPatches"]
    value = patch["patch"]["value"]
    cluster = value["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    envoy_validate(bootstrap_with(value, cluster), tmp_path)


def test_the_envoyfilter_is_the_guides():
    (f,) = load_all(DEPLOY / "istio" / "envoyfilter.yaml")
    assert f["apiVersion"] == "networking.istio.io/v1alpha3"
    assert f["kind"] == "EnvoyFilter"
    assert f["metadata"]["name"] == "httpbin-ext-proc"
    (patch,) = f["spec"]["configPatches"]
    assert patch["applyTo"] == "HTTP_FILTER"
    assert patch["match"]["context"] == "SIDECAR_INBOUND"
    assert patch["match"]["listener"]["portNumber"] == 80
    chain = patch["match"]["listener"]["filterChain"]["filter"]
    assert chain["name"] == "envoy.filters.network.http_connection_manager"
    assert chain["subFilter"]["name"] == "envoy.filters.http.router"
    assert patch["patch"]["operation"] == "INSERT_BEFORE"
    value = patch["patch"]["value"]
    assert value["name"] == "envoy.filters.http.ext_proc"
    config = value["typed_config"]
    assert config["@type"].endswith("envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor")
    assert config["grpc_service"]["envoy_grpc"]["cluster_name"] == EXT_PROC_CLUSTER
    assert config["processing_mode"]["request_header_mode"] == "SEND"
    assert config["processing_mode"]["response_header_mode"] == "SEND"
    # The pairing with the host the README explains.
    assert config["failure_mode_allow"] is False
    assert config["message_timeout"] == "0.2s"
    assert config["allow_mode_override"] is True


# Per-route chains. The host reads a stream's chain from this gRPC initial metadata, or maps
# the route name (the xds.route_name attribute) through `[chains.NAME] routes`; plugins of the
# chain NAME live in the plugins directory's NAME/ subdirectory.
CHAIN_METADATA = "x-wasm-extproc-chain"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
EXT_PROC_PER_ROUTE = (
    "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
)
CHECKOUT_CHAIN = {
    "@type": EXT_PROC_PER_ROUTE,
    "overrides": {"grpc_initial_metadata": [{"key": CHAIN_METADATA, "value": "checkout"}]},
}
NO_EXT_PROC = {"@type": EXT_PROC_PER_ROUTE, "disabled": True}


def http_connection_manager(bootstrap):
    listener = bootstrap["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def routes_of(bootstrap):
    (virtual_host,) = http_connection_manager(bootstrap)["route_config"]["virtual_hosts"]
    return virtual_host["routes"]


def commented_example(path, intro):
    """The example in `path`'s comments introduced by the comment line ending with `intro`:
    after one empty comment line, the lines indented past `#   `, without that prefix."""
    lines = path.read_text().splitlines()
    (start,) = [i for i, line in enumerate(lines) if line.startswith("#") and line.endswith(intro)]
    assert lines[start + 1] == "#", lines[start + 1]
    example = []
    for line in lines[start + 2 :]:
        if not line.startswith("#   "):
            break
        example.append(line.removeprefix("#   "))
    assert example, f"no example after {intro!r}"
    return "\n".join(example)


def test_the_standalone_envoy_routes_checkout_and_static_before_the_default():
    (bootstrap,) = load_all(DEPLOY / "envoy" / "envoy.yaml")
    ext_proc = http_connection_manager(bootstrap)["http_filters"][0]
    assert ext_proc["name"] == EXT_PROC_FILTER
    # Route names as attributes would be evaluated on every request: metadata instead. The one
    # attribute is the client's address, which the breaker and the rate limit need.
    assert ext_proc["typed_config"]["request_attributes"] == ["source.address"]
    checkout, static, default = routes_of(bootstrap)
    assert checkout == {
        "name": "checkout",
        "match": {"prefix": "/checkout"},
        "route": {"cluster": "httpbin"},
        "typed_per_filter_config": {ext_proc["name"]: CHECKOUT_CHAIN},
    }
    assert static == {
        "name": "static",
        "match": {"prefix": "/static"},
        "route": {"cluster": "httpbin"},
        "typed_per_filter_config": {ext_proc["name"]: NO_EXT_PROC},
    }
    # The catch-all every system test goes through: last, and the filter's settings apply as
    # they are.
    assert default == {"name": "default", "match": {"prefix": "/"}, "route": {"cluster": "httpbin"}}


@pytest.mark.parametrize(
    "text, wrong, error",
    [
        ("grpc_initial_metadata:", "grpc_initial_metdata:", "grpc_initial_metdata"),
        ("disabled: true", "disabled: 3", "disabled"),
        ("v3.ExtProcPerRoute\n", "v3.ExtProcPerRoutes\n", "ExtProcPerRoutes"),
    ],
)
def test_envoy_checks_the_per_route_settings(text, wrong, error, tmp_path):
    config = (DEPLOY / "envoy" / "envoy.yaml").read_text()
    assert text in config
    with pytest.raises(AssertionError, match=error):
        envoy_validate(config.replace(text, wrong), tmp_path)


def test_the_gateway_route_patches_validate_inside_a_bootstrap(tmp_path):
    (gateway_filter,) = load_all(DEPLOY / "istio" / "envoyfilter-gateway.yaml")
    (routes_filter,) = load_all(DEPLOY / "istio" / "envoyfilter-routes.yaml")
    # The gateway pods the ext_proc filter is inserted into.
    assert routes_filter["metadata"]["namespace"] == gateway_filter["metadata"]["namespace"]
    assert routes_filter["spec"]["workloadSelector"] == gateway_filter["spec"]["workloadSelector"]
    (filter_patch,) = gateway_filter["spec"]["configPatches"]
    ext_proc = filter_patch["patch"]["value"]
    cluster = ext_proc["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    bootstrap = bootstrap_dict_with(ext_proc, cluster)

    # The standalone routes without their ext_proc settings stand for the routes Istio makes
    # from the VirtualService; the patches must give them back the same settings.
    routes = routes_of(bootstrap)
    standalone = {route["name"]: route.pop("typed_per_filter_config", None) for route in routes}
    patched = []
    for patch in routes_filter["spec"]["configPatches"]:
        assert patch["applyTo"] == "HTTP_ROUTE"
        assert patch["match"]["context"] == "GATEWAY"
        assert patch["patch"]["operation"] == "MERGE"
        name = patch["match"]["routeConfiguration"]["vhost"]["route"]["name"]
        (route,) = [r for r in routes if r["name"] == name]
        value = patch["patch"]["value"]
        # Nothing there to merge with: MERGE adds the fields as they are.
        assert not value.keys() & route.keys()
        route.update(copy.deepcopy(value))
        assert set(route["typed_per_filter_config"]) == {ext_proc["name"]}
        patched.append(name)
    assert patched == ["checkout", "static"]
    assert {r["name"]: r.get("typed_per_filter_config") for r in routes} == standalone
    envoy_validate(yaml.safe_dump(bootstrap), tmp_path)


def test_the_gateway_route_patches_name_the_virtualservice_routes_in_their_comment():
    path = DEPLOY / "istio" / "envoyfilter-routes.yaml"
    http = yaml.safe_load(commented_example(path, "This relies on:"))["http"]
    service = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "httpbin", "namespace": "default"},
        "spec": {"hosts": ["*"], "gateways": ["istio-system/ingressgateway"], "http": http},
    }
    result = crd_validation([service])
    assert result.returncode == 0, result.stdout + result.stderr
    # Istio names the Envoy route after the http route, NAME.MATCH if its match has a name.
    assert not any("name" in match for route in http for match in route["match"])
    (routes_filter,) = load_all(path)
    assert [route["name"] for route in http] == [
        patch["match"]["routeConfiguration"]["vhost"]["route"]["name"]
        for patch in routes_filter["spec"]["configPatches"]
    ]
    # The paths the standalone Envoy's routes of the same names match.
    (bootstrap,) = load_all(DEPLOY / "envoy" / "envoy.yaml")
    prefixes = {route["name"]: route["match"]["prefix"] for route in routes_of(bootstrap)}
    for route in http:
        assert route["match"] == [{"uri": {"prefix": prefixes[route["name"]]}}]


def envoy_gateway_route_name(namespace, name, rule, match, hostname="*"):
    """The name Envoy Gateway gives the Envoy route of an HTTPRoute's rule and match
    (internal/gatewayapi: irRouteName, then one route per hostname, dots as underscores)."""
    host = hostname.replace(".", "_")
    return f"httproute/{namespace}/{name}/rule/{rule}/match/{match}/{host}"


def test_the_envoy_gateway_route_policy_sends_the_route_name_the_host_maps():
    path = DEPLOY / "envoy-gateway" / "extension-policy-routes.yaml"
    (policy,) = load_all(path)
    (httpbin_policy,) = load_all(DEPLOY / "envoy-gateway" / "extension-policy.yaml")
    (target,) = policy["spec"]["targetRefs"]
    assert target == {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "checkout"}
    assert target not in httpbin_policy["spec"]["targetRefs"]
    (ext_proc,) = policy["spec"]["extProc"]
    request = ext_proc["processingMode"]["request"]
    # The route's name beside the client's address, which the httpbin policy sends too (the
    # breaker tells clients apart by it).
    (httpbin_ext_proc,) = httpbin_policy["spec"]["extProc"]
    assert request == {"attributes": ["xds.route_name", "source.address"]}
    assert httpbin_ext_proc["processingMode"]["request"] == {"attributes": ["source.address"]}
    # Otherwise the httpbin policy's settings.
    without_route = copy.deepcopy(ext_proc)
    without_route["processingMode"]["request"] = httpbin_ext_proc["processingMode"]["request"]
    assert without_route == httpbin_ext_proc
    # The host configuration the comment gives, for the HTTPRoute's first rule and match.
    config = tomllib.loads(commented_example(path, "into the host's config:"))
    route = envoy_gateway_route_name(policy["metadata"]["namespace"], target["name"], 0, 0)
    assert config == {"chains": {"checkout": {"routes": [route]}}}


def test_the_crd_validation_catches_a_bad_route_patch_and_attribute():
    (routes_filter,) = load_all(DEPLOY / "istio" / "envoyfilter-routes.yaml")
    routes_filter["spec"]["configPatches"][0]["applyTo"] = "HTTP_ROUTES"
    (policy,) = load_all(DEPLOY / "envoy-gateway" / "extension-policy-routes.yaml")
    policy["spec"]["extProc"][0]["processingMode"]["request"]["attributes"] = ["xds.cluster_name"]
    result = crd_validation([routes_filter, policy])
    assert result.returncode == 1
    assert "configPatches/0/applyTo must be equal to one of the allowed values" in result.stdout
    assert "request/attributes/0 must match pattern" in result.stdout


def crd_validation(resources):
    # ES modules find packages beside the importing file: run a copy that sits next to the
    # installed node_modules.
    script = TOOLS / "node" / "validate-crds.mjs"
    shutil.copyfile(DEPLOY / "tests" / "validate-crds.mjs", script)
    return subprocess.run(
        ["node", str(script)],
        input=json.dumps(resources),
        capture_output=True,
        text=True,
    )


CUSTOM_RESOURCES = [
    DEPLOY / "istio" / "envoyfilter.yaml",
    DEPLOY / "istio" / "envoyfilter-in-process.yaml",
    DEPLOY / "istio" / "envoyfilter-gateway.yaml",
    DEPLOY / "istio" / "envoyfilter-routes.yaml",
    DEPLOY / "istio" / "destinationrule.yaml",
    DEPLOY / "istio" / "authorizationpolicy.yaml",
    DEPLOY / "envoy-gateway" / "extension-policy.yaml",
    DEPLOY / "envoy-gateway" / "extension-policy-routes.yaml",
]

# What one replica holds by default ([runtime] max_instances): Envoy's side must allow at least
# as many requests in flight to the ext_proc cluster.
HOST_INSTANCES = 14_000


def test_every_envoy_side_lets_as_many_requests_through_as_the_host_holds():
    (config,) = load_all(DEPLOY / "envoy" / "envoy.yaml")
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "ext_proc"]
    (thresholds,) = cluster["circuit_breakers"]["thresholds"]
    assert thresholds["max_requests"] >= HOST_INSTANCES
    assert thresholds["max_pending_requests"] >= HOST_INSTANCES

    (rule,) = load_all(DEPLOY / "istio" / "destinationrule.yaml")
    assert rule["spec"]["host"] == "ext-proc.default.svc.cluster.local"
    assert EXT_PROC_CLUSTER.endswith("||" + rule["spec"]["host"])
    http = rule["spec"]["trafficPolicy"]["connectionPool"]["http"]
    assert http["http2MaxRequests"] >= HOST_INSTANCES

    for file in ["extension-policy.yaml", "extension-policy-routes.yaml"]:
        (policy,) = load_all(DEPLOY / "envoy-gateway" / file)
        (ext_proc,) = policy["spec"]["extProc"]
        breaker = ext_proc["backendSettings"]["circuitBreaker"]
        assert breaker["maxParallelRequests"] >= HOST_INSTANCES
        assert breaker["maxPendingRequests"] >= HOST_INSTANCES


def test_custom_resources_validate_against_their_crd_schemas():
    resources = [doc for path in CUSTOM_RESOURCES for doc in load_all(path)]
    result = crd_validation(resources)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == len(resources), result.stdout


def test_the_crd_validation_catches_a_broken_resource():
    (broken,) = load_all(DEPLOY / "istio" / "envoyfilter.yaml")
    broken["spec"]["configPatches"][0]["patch"]["operation"] = "INSERT_SOMEWHERE"
    result = crd_validation([broken])
    assert result.returncode == 1
    assert "operation must be equal to one of the allowed values" in result.stdout


def test_the_crd_validation_catches_an_authorizationpolicy_port_given_as_a_number():
    (broken,) = load_all(DEPLOY / "istio" / "authorizationpolicy.yaml")
    broken["spec"]["rules"][0]["to"][0]["operation"]["ports"] = [9002]
    result = crd_validation([broken])
    assert result.returncode == 1
    assert "ports/0 must be string" in result.stdout


def kustomize(path):
    result = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def validate_kubernetes(resource):
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


@pytest.fixture(scope="module")
def plugins_configmap():
    """The ConfigMap the base expects, made from what deploy/build.sh built."""
    path = DEPLOY / "k8s" / "base" / "plugins-configmap.yaml"
    result = subprocess.run(
        [str(DEPLOY / "k8s" / "plugins-configmap.sh"), str(DIST / "plugins")],
        capture_output=True,
        check=True,
    )
    path.write_bytes(result.stdout)
    return path


def test_every_manifest_validates_against_the_kubernetes_schemas(plugins_configmap):
    # The base's manifests; the image-volume patch is validated rendered, below.
    files = sorted((DEPLOY / "k8s" / "base").glob("*.yaml"))
    files = [f for f in files if f.name != "kustomization.yaml"]
    kinds = set()
    for path in files:
        for resource in load_all(path):
            validate_kubernetes(resource)
            kinds.add(resource["kind"])
    assert kinds == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "NetworkPolicy",
    }


@pytest.mark.parametrize("variant", ["k8s/base", "k8s/image-volume", "k8s/signed", "k8s/redis"])
def test_kustomize_renders_valid_resources(variant, plugins_configmap):
    rendered = kustomize(DEPLOY / variant)
    for resource in rendered:
        validate_kubernetes(resource)
    deployment = next(r for r in rendered if r["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "plugins"]
    if variant in ("k8s/base", "k8s/signed", "k8s/redis"):
        assert volume["configMap"]["name"] == "wasm-extproc-plugins"
    else:
        assert "configMap" not in volume and "emptyDir" in volume
        assert spec["initContainers"][0]["volumeMounts"][0]["name"] == "plugins"


def test_the_signed_variant_mounts_the_keys_its_configuration_trusts(plugins_configmap):
    import tomllib

    rendered = kustomize(DEPLOY / "k8s/signed")
    deployment = next(r for r in rendered if r["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (config_arg,) = [a for a in container["args"] if a.startswith("--config=")]
    config_path = pathlib.PurePosixPath(config_arg.split("=", 1)[1])

    def mounted(path):
        """The ConfigMap and key a file path in the container reads."""
        (mount,) = [
            m
            for m in container["volumeMounts"]
            if path.parent == pathlib.PurePosixPath(m["mountPath"])
        ]
        assert mount.get("readOnly") is True
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        name = volume["configMap"]["name"]
        (config_map,) = [
            r
            for r in rendered
            if r["kind"] == "ConfigMap" and r["metadata"]["name"] == name
        ]
        return config_map, path.name

    config_map, key = mounted(config_path)
    settings = tomllib.loads(config_map["data"][key])
    assert settings["signing"]["require_signatures"] is True
    assert settings["signing"]["trusted_keys"]
    for trusted in settings["signing"]["trusted_keys"]:
        keys, key = mounted(pathlib.PurePosixPath(trusted))
        assert keys["data"][key].startswith("-----BEGIN PUBLIC KEY-----"), key


def test_the_redis_variant_points_every_replica_at_its_redis_and_only_they_reach_it(
    plugins_configmap, tmp_path
):
    import tomllib

    rendered = kustomize(DEPLOY / "k8s/redis")
    by_name = {(r["kind"], r["metadata"]["name"]): r for r in rendered}
    host = by_name[("Deployment", "ext-proc")]
    pod = host["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (config_arg,) = [a for a in container["args"] if a.startswith("--config=")]
    path = pathlib.PurePosixPath(config_arg.split("=", 1)[1])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_map = by_name[("ConfigMap", volume["configMap"]["name"])]
    text = config_map["data"][path.name]
    kv = tomllib.loads(text)["kv"]
    assert kv["backend"] == "redis"
    # Its own key prefix, so another Deployment on the same Redis stays apart.
    assert kv["prefix"] == "wasm-extproc"

    # The URL names the Service, on its port; the Service selects Redis's pods, on the port
    # the Redis container listens on.
    url = kv["url"].removeprefix("redis://")
    service_name, port = url.split(":")
    service = by_name[("Service", service_name)]
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == int(port)
    redis = by_name[("Deployment", "wasm-extproc-redis")]
    redis_pod = redis["spec"]["template"]
    labels = redis_pod["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    (redis_container,) = redis_pod["spec"]["containers"]
    assert service_port["targetPort"] in [p["name"] for p in redis_container["ports"]]
    assert redis_pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert redis_container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "--save" in redis_container["args"], "a cache: nothing written to disk"

    # Only the host's pods may connect to Redis.
    policy = by_name[("NetworkPolicy", "wasm-extproc-redis")]
    assert all(labels.get(k) == v for k, v in policy["spec"]["podSelector"]["matchLabels"].items())
    (rule,) = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [6379]
    (peer,) = rule["from"]
    host_labels = host["spec"]["template"]["metadata"]["labels"]
    assert all(host_labels.get(k) == v for k, v in peer["podSelector"]["matchLabels"].items())

    # The host accepts the file (it connects to Redis on first use, so no Redis is needed).
    config = tmp_path / "host.toml"
    config.write_text(text)
    result = subprocess.run(
        [
            str(DIST / "bin" / "wasm-extproc"),
            "check",
            "--config",
            str(config),
            "--plugins-dir",
            str(DIST / "plugins"),
            "--admin-listen",
            "off",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "RUST_LOG": "off"},
    )
    assert result.returncode == 0, result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text(text.replace('backend = "redis"', 'backend = "redis"\nurl_typo = 1'))
    result = subprocess.run(
        [str(DIST / "bin" / "wasm-extproc"), "check", "--config", str(broken)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "url_typo" in result.stderr, result.stderr


def test_the_deployment_is_locked_down_and_probed():
    (deployment,) = load_all(DEPLOY / "k8s" / "base" / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["readinessProbe"]["grpc"]["port"] == 9002
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"]["memory"]
    # The memory limit holds the host's default budget for bodies held (each also copied into
    # a plugin and answered back: three times), with room for the rest of the host.
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    source = (DEPLOY.parent / "core" / "src" / "bodies.rs").read_text()
    (budget_mib,) = re.findall(r"DEFAULT_MAX_BODY_BYTES_IN_FLIGHT: u64 = (\d+) << 20", source)
    assert int(limit[:-2]) >= 3 * int(budget_mib) + 64, (limit, budget_mib)
    assert {m["mountPath"] for m in container["volumeMounts"]} == {
        "/plugins",
        "/var/cache/wasm-extproc",
    }
    (service,) = load_all(DEPLOY / "k8s" / "base" / "service.yaml")
    assert service["metadata"]["name"] == "ext-proc"
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert (grpc["port"], grpc["appProtocol"]) == (9002, "grpc")


# Who may talk to the host: the policies and Services, checked against the Deployment as
# kustomize renders it (the pods they must select, the ports those pods have).


def rendered_pod(rendered):
    """The rendered Deployment's namespace, pod labels and container ports."""
    (deployment,) = [r for r in rendered if r["kind"] == "Deployment"]
    template = deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    return deployment["metadata"]["namespace"], template["metadata"]["labels"], container["ports"]


def selects(selector, labels):
    """Whether a LabelSelector selects pods labelled `labels`. Only matchLabels: the policies
    use nothing else, and a selector that did would fail here rather than be half-checked."""
    assert set(selector) == {"matchLabels"}, selector
    assert selector["matchLabels"], "an empty selector selects every pod in the namespace"
    return selector["matchLabels"].items() <= labels.items()


def container_port(ports, port):
    """The name of the container port `port` designates, by number or by name (None if none)."""
    for p in ports:
        if port in (p["containerPort"], p["name"]) and p.get("protocol", "TCP") == "TCP":
            return p["name"]
    return None


def resource(rendered, kind, name):
    (found,) = [r for r in rendered if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("variant", ["k8s/base", "k8s/image-volume"])
def test_the_networkpolicy_selects_the_pods_and_admits_their_two_ports(variant, plugins_configmap):
    rendered = kustomize(DEPLOY / variant)
    namespace, labels, ports = rendered_pod(rendered)
    policy = resource(rendered, "NetworkPolicy", "ext-proc")
    assert policy["metadata"]["namespace"] == namespace
    assert selects(policy["spec"]["podSelector"], labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    admitted = []
    for rule in policy["spec"]["ingress"]:
        # A rule without `from` (or without `ports`) would admit every peer (or every port).
        assert rule["from"] and rule["ports"], rule
        admitted += [container_port(ports, p["port"]) for p in rule["ports"]]
    assert sorted(admitted) == ["admin", "grpc"]


def test_the_networkpolicy_admits_the_envoys_to_grpc_and_only_monitoring_to_admin():
    (policy,) = load_all(DEPLOY / "k8s" / "base" / "networkpolicy.yaml")
    (deployment,) = load_all(DEPLOY / "k8s" / "base" / "deployment.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    rules = {
        container_port(container["ports"], port["port"]): rule["from"]
        for rule in policy["spec"]["ingress"]
        for port in rule["ports"]
    }
    assert not any("ipBlock" in peer for peers in rules.values() for peer in peers)

    # Every Envoy the deploy/ files give the filter is among the peers admitted to ext_proc.
    (gateway_filter,) = load_all(DEPLOY / "istio" / "envoyfilter-gateway.yaml")
    gateway = {
        "namespaceSelector": {
            "matchLabels": {"kubernetes.io/metadata.name": gateway_filter["metadata"]["namespace"]}
        },
        "podSelector": {"matchLabels": gateway_filter["spec"]["workloadSelector"]["labels"]},
    }
    assert gateway in rules["grpc"]
    assert {"namespaceSelector": {"matchLabels": {"istio-injection": "enabled"}}} in rules["grpc"]
    (envoy_gateway,) = [
        peer
        for peer in rules["grpc"]
        if peer.get("namespaceSelector", {}).get("matchLabels")
        == {"kubernetes.io/metadata.name": "envoy-gateway-system"}
    ]
    # The labels Envoy Gateway puts on the proxy pods it creates.
    assert selects(
        envoy_gateway["podSelector"],
        {
            "app.kubernetes.io/name": "envoy",
            "app.kubernetes.io/component": "proxy",
            "app.kubernetes.io/managed-by": "envoy-gateway",
        },
    )
    standalone = {
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {"wasm-extproc.io/client": "true"}},
    }
    assert standalone in rules["grpc"]

    assert rules["admin"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


@pytest.mark.parametrize("variant", ["k8s/base", "k8s/image-volume"])
def test_the_admin_port_is_off_the_service_and_on_a_headless_one(variant, plugins_configmap):
    rendered = kustomize(DEPLOY / variant)
    namespace, labels, ports = rendered_pod(rendered)

    # The name and port the EnvoyFilters' cluster (EXT_PROC_CLUSTER) points at, and only that.
    service = resource(rendered, "Service", "ext-proc")
    assert EXT_PROC_CLUSTER == f"outbound|9002||ext-proc.{namespace}.svc.cluster.local"
    assert service["spec"]["selector"].items() <= labels.items()
    (grpc,) = service["spec"]["ports"]
    assert (grpc["name"], grpc["port"], grpc["appProtocol"]) == ("grpc", 9002, "grpc")
    assert container_port(ports, grpc["targetPort"]) == "grpc"

    admin = resource(rendered, "Service", "ext-proc-admin")
    assert admin["metadata"]["namespace"] == namespace
    assert admin["spec"]["clusterIP"] == "None"
    assert admin["spec"]["selector"].items() <= labels.items()
    (port,) = admin["spec"]["ports"]
    assert container_port(ports, port["targetPort"]) == "admin"
    # Headless: nothing translates ports, scrapers connect to the pod on the Service's port.
    assert container_port(ports, port["port"]) == "admin"

    # The pod annotations name the same port, for scrapers that discover pods.
    (deployment,) = [r for r in rendered if r["kind"] == "Deployment"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert container_port(ports, int(annotations["prometheus.io/port"])) == "admin"


def test_the_authorizationpolicy_selects_the_pods_and_admits_the_envoys_identities(
    plugins_configmap,
):
    namespace, labels, ports = rendered_pod(kustomize(DEPLOY / "k8s" / "base"))
    (policy,) = load_all(DEPLOY / "istio" / "authorizationpolicy.yaml")
    # Without a selector, an ALLOW policy would apply to every workload in the namespace.
    assert policy["metadata"]["namespace"] == namespace
    assert selects(policy["spec"]["selector"], labels)
    assert policy["spec"]["action"] == "ALLOW"

    sources = {}
    for rule in policy["spec"]["rules"]:
        (source,) = rule["from"]
        (to,) = rule["to"]
        for port in to["operation"]["ports"]:
            sources[container_port(ports, int(port))] = source["source"]
    assert set(sources) == {"grpc", "admin"}

    # The identities of the Envoys deploy/istio gives the filter: the ingress gateway's service
    # account and httpbin's (the guide's app), each in its EnvoyFilter's namespace.
    (gateway_filter,) = load_all(DEPLOY / "istio" / "envoyfilter-gateway.yaml")
    (sidecar_filter,) = load_all(DEPLOY / "istio" / "envoyfilter.yaml")
    assert sidecar_filter["spec"]["workloadSelector"]["labels"] == {"app": "httpbin"}
    assert sources["grpc"] == {
        "principals": [
            f"cluster.local/ns/{gateway_filter['metadata']['namespace']}"
            "/sa/istio-ingressgateway-service-account",
            f"cluster.local/ns/{sidecar_filter['metadata']['namespace']}/sa/httpbin",
        ]
    }
    # The same namespace the NetworkPolicy admits to the admin port.
    (network_policy,) = load_all(DEPLOY / "k8s" / "base" / "networkpolicy.yaml")
    monitoring = [
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for rule in network_policy["spec"]["ingress"]
        if container_port(ports, rule["ports"][0]["port"]) == "admin"
        for peer in rule["from"]
    ]
    assert sources["admin"] == {"namespaces": monitoring}


def test_the_configmap_script_round_trips_plugin_bytes(tmp_path):
    sources = {
        "10-asm-demo.wasm": DIST / "plugins" / "10-asm-demo.wasm",
        "20-auth.wasm": DIST / "examples" / "bearer_auth.wasm",
    }
    for name, source in sources.items():
        (tmp_path / name).write_bytes(source.read_bytes())
    result = subprocess.run(
        [str(DEPLOY / "k8s" / "plugins-configmap.sh"), str(tmp_path), "my-plugins"],
        capture_output=True,
        check=True,
    )
    (configmap,) = [d for d in yaml.safe_load_all(result.stdout) if d]
    validate_kubernetes(configmap)
    assert configmap["metadata"]["name"] == "my-plugins"
    assert set(configmap["binaryData"]) == set(sources)
    for name, source in sources.items():
        assert base64.b64decode(configmap["binaryData"][name]) == source.read_bytes()


def test_the_configmap_script_refuses_an_empty_directory(tmp_path):
    result = subprocess.run(
        [str(DEPLOY / "k8s" / "plugins-configmap.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "no .wasm files" in result.stderr


def test_the_dockerfile_builds_with_the_tested_script_and_runs_unprivileged():
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) == 2, "multi-stage: build, then a small runtime"
    assert "RUN deploy/build.sh /out" in lines
    assert "USER 65532:65532" in lines
    assert any(line.startswith("COPY --from=build /out/plugins/ /plugins/") for line in lines)
    assert 'EXPOSE 9002 9003' in lines
    assert lines[-1].startswith("CMD [") and "0.0.0.0:9002" in lines[-1]


def test_what_the_image_ships_is_complete_and_passes_check():
    binary = DIST / "bin" / "wasm-extproc"
    assert os.access(binary, os.X_OK)
    result = subprocess.run(
        [str(binary), "--admin-listen", "off", "check", "--plugins-dir", str(DIST / "plugins")],
        capture_output=True,
        text=True,
        env={**os.environ, "RUST_LOG": "off"},
    )
    assert result.returncode == 0, result.stderr
    assert "ok  10-asm-demo" in result.stderr
    for example in ["bearer_auth.wasm", "json_redact.wasm"]:
        assert (DIST / "examples" / example).is_file()


# Dashboards and alerts (deploy/monitoring): the rules checked and unit-tested by promtool, the
# PrometheusRule generated from them, the dashboard's queries parsed by promtool, and every
# metric and label they name one the host exports and the README documents.
MONITORING = DEPLOY / "monitoring"
RULES = MONITORING / "alerts.rules.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
# Labels Prometheus adds from the scrape target (kube-prometheus's ServiceMonitors add these).
TARGET_LABELS = {"instance", "job", "namespace", "pod"}


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not on PATH: `cargo xtask test` installs it (Debian's prometheus)")
    return path


def run_promtool(promtool, *args):
    return subprocess.run([promtool, *args], capture_output=True, text=True)


def alerting_rules():
    (group,) = yaml.safe_load(RULES.read_text())["groups"]
    return group["rules"]


def test_promtool_checks_the_alerting_rules(promtool):
    result = run_promtool(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerting_rules())} rules found" in result.stdout


def test_promtool_rejects_broken_alerting_rules(promtool, tmp_path):
    broken = tmp_path / "alerts.rules.yaml"
    broken.write_text(RULES.read_text().replace("> 0.01", "> > 0.01", 1))
    result = run_promtool(promtool, "check", "rules", str(broken))
    assert result.returncode == 1
    assert "unexpected" in result.stdout + result.stderr


def test_the_alerting_rules_unit_tests_pass(promtool):
    result = run_promtool(promtool, "test", "rules", str(MONITORING / "alerts.test.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alerting_rules_unit_tests_fail_on_a_wrong_threshold(promtool, tmp_path):
    rules = RULES.read_text()
    assert rules.count("> 0.01\n") == 1
    (tmp_path / RULES.name).write_text(rules.replace("> 0.01\n", "> 0.001\n"))
    shutil.copy(MONITORING / "alerts.test.yaml", tmp_path)
    result = run_promtool(promtool, "test", "rules", str(tmp_path / "alerts.test.yaml"))
    assert result.returncode == 1
    assert "name: a healthy host raises nothing" in result.stdout + result.stderr


def test_every_alert_in_the_rules_is_unit_tested_firing_and_quiet():
    tests = yaml.safe_load((MONITORING / "alerts.test.yaml").read_text())
    assert tests["rule_files"] == [RULES.name]
    fired, quiet_when_healthy = set(), set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            if check.get("exp_alerts"):
                fired.add(check["alertname"])
            elif case["name"] == "a healthy host raises nothing":
                quiet_when_healthy.add(check["alertname"])
    names = {rule["alert"] for rule in alerting_rules()}
    assert names == {
        "WasmExtprocPluginFailing",
        "WasmExtprocPluginQuarantined",
        "WasmExtprocReloadFailing",
        "WasmExtprocLatencyNearMessageTimeout",
        "WasmExtprocInstancePoolNearFull",
    }
    assert fired == names
    assert quiet_when_healthy == names


def test_every_alert_in_the_rules_says_how_bad_what_and_where_to_read_on():
    readme = (ROOT / "README.md").read_text()
    # The anchor GitHub gives the heading the runbook links point at.
    assert "\n## Operating it\n" in readme
    for rule in alerting_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, rule["alert"]
        assert annotations["runbook_url"] == "README.md#operating-it"
    # How the annotations render (the labels they name kept by the expression) is in
    # alerts.test.yaml: promtool compares every firing alert's annotations in full.


def test_the_prometheusrule_is_generated_from_the_rules_file():
    result = subprocess.run(
        [str(MONITORING / "prometheusrule.sh")], capture_output=True, text=True, check=True
    )
    path = MONITORING / "prometheusrule.yaml"
    assert path.read_text() == result.stdout, "rerun deploy/monitoring/prometheusrule.sh"
    (rule,) = load_all(path)
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    assert set(rule["spec"]) == {"groups"}


# The PrometheusRule's structure as the Prometheus Operator's CRD (monitoring.coreos.com/v1)
# defines it. Not that CRD's own schema: no pinned @kubernetes-models package carries it. Unknown
# fields are refused, as the API server would silently prune them.
PROMETHEUS_DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
PROMETHEUS_RULE_STRUCTURE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "namespace": {"type": "string", "minLength": 1},
                "labels": STRING_MAP,
                "annotations": STRING_MAP,
            },
        },
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": PROMETHEUS_DURATION},
                            "limit": {"type": "integer"},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "additionalProperties": False,
                                    "properties": {
                                        "alert": {"type": "string", "minLength": 1},
                                        "record": {"type": "string", "minLength": 1},
                                        "expr": {"type": ["string", "integer"]},
                                        "for": {"type": "string", "pattern": PROMETHEUS_DURATION},
                                        "keep_firing_for": {
                                            "type": "string",
                                            "pattern": PROMETHEUS_DURATION,
                                        },
                                        "labels": STRING_MAP,
                                        "annotations": STRING_MAP,
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    },
}


def prometheusrule_errors(rule):
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft202012Validator(PROMETHEUS_RULE_STRUCTURE).iter_errors(rule)
    ]
    names = [group["name"] for group in rule.get("spec", {}).get("groups", [])]
    if len(names) != len(set(names)):
        errors.append(f"spec/groups: names are the list's keys, and repeat: {names}")
    return errors


def test_the_prometheusrule_has_the_operators_structure():
    (rule,) = load_all(MONITORING / "prometheusrule.yaml")
    assert prometheusrule_errors(rule) == []


def test_the_prometheusrule_structure_check_catches_a_broken_rule():
    (rule,) = load_all(MONITORING / "prometheusrule.yaml")
    first = rule["spec"]["groups"][0]["rules"][0]
    first["annotation"] = first.pop("annotations")
    first["for"] = "5 minutes"
    rule["spec"]["groups"].append(copy.deepcopy(rule["spec"]["groups"][0]))
    errors = "\n".join(prometheusrule_errors(rule))
    assert "'annotation' was unexpected" in errors
    assert "'5 minutes' does not match" in errors
    assert "names are the list's keys, and repeat" in errors


def test_the_prometheusrule_lives_where_prometheus_scrapes_from():
    (rule,) = load_all(MONITORING / "prometheusrule.yaml")
    (network_policy,) = load_all(DEPLOY / "k8s" / "base" / "networkpolicy.yaml")
    (admin,) = [r for r in network_policy["spec"]["ingress"] if r["ports"][0]["port"] == 9003]
    (peer,) = admin["from"]
    monitoring = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
    assert rule["metadata"]["namespace"] == monitoring


def dashboard_panels():
    return json.loads(DASHBOARD.read_text())["panels"]


def dashboard_queries():
    """Every PromQL query of the dashboard, with Grafana's variables given values."""
    return [
        (panel["title"], target["expr"].replace("$__rate_interval", "5m"))
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]


def variable_selectors():
    """The series selectors in the dashboard's label_values() variables."""
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    return [
        re.fullmatch(r"label_values\((.+), \w+\)", v["query"]).group(1)
        for v in variables
        if v["type"] == "query"
    ]


def test_the_dashboard_uses_its_datasource_variable_everywhere():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"datasource", "chain", "plugin"}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == (
        "datasource",
        "prometheus",
    )
    ours = {"type": "prometheus", "uid": "${datasource}"}
    assert variables["chain"]["datasource"] == variables["plugin"]["datasource"] == ours
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"] == ours, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == ours, panel["title"]


def test_the_dashboard_queries_parse_with_promtool(promtool, tmp_path):
    # promtool parses PromQL only within rules (its queries need a server): each query becomes
    # a recording rule.
    exprs = [expr for _, expr in dashboard_queries()] + variable_selectors()
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or"}
PROMQL_KEYWORDS |= {"unless", "offset", "bool", "inf", "nan", "atan2"}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def promql_names(expr):
    """The metric names in `expr` and the labels it names, as (metrics, labels by metric,
    grouping labels): strings, comments, ranges and groupings set aside, every identifier that
    does not call a function or aggregation is a metric."""
    labels = {}
    for metric, matchers in re.findall(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", expr):
        names = re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", matchers)
        labels.setdefault(metric, set()).update(names)
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    bare = re.sub(r"#[^\n]*", "", bare)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    grouping = {label.strip() for group in GROUPING.findall(bare) for label in group.split(",")}
    bare = GROUPING.sub(" ", bare)
    metrics = {
        name
        for name in re.findall(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()", bare)
        if name.lower() not in PROMQL_KEYWORDS
    }
    return metrics, labels, grouping - {""}


def test_the_monitoring_promql_name_extraction_finds_every_metric():
    expr = (
        'sum by (chain) (rate(wasm_extproc_plugin_cals_total{outcome="ok", plugin=~"a|b"}[5m]))\n'
        "# a comment naming wasm_extproc_nothing\n"
        "/ on (job) group_left up offset 5m > 1e-3 or vector(0) unless absent(other_metric)"
    )
    metrics, labels, grouping = promql_names(expr)
    assert metrics == {"wasm_extproc_plugin_cals_total", "up", "other_metric"}
    assert labels == {"wasm_extproc_plugin_cals_total": {"outcome", "plugin"}}
    assert grouping == {"chain", "job"}


def monitoring_queries():
    """(where, expr) for every query the dashboard and the alerting rules make."""
    return (
        [(f"dashboard panel {title!r}", expr) for title, expr in dashboard_queries()]
        + [("dashboard variable", selector) for selector in variable_selectors()]
        + [(f"alert {rule['alert']}", rule["expr"]) for rule in alerting_rules()]
    )


def test_the_dashboard_and_rules_name_exactly_the_metrics_in_metrics_txt():
    # metrics.txt is what the host's own test finds in a live /metrics.
    listed = (MONITORING / "metrics.txt").read_text().splitlines()
    assert listed == sorted(set(listed)), "metrics.txt: one name a line, sorted, no repeats"
    used = set()
    for where, expr in monitoring_queries():
        metrics, _, _ = promql_names(expr)
        assert metrics, where
        for metric in metrics:
            assert metric.startswith("wasm_extproc_"), (where, metric)
            assert metric in listed, f"{where}: {metric} is not in metrics.txt"
        used |= metrics
    assert used == set(listed), f"in metrics.txt, used nowhere: {set(listed) - used}"


def documented_metrics():
    """The README's Metrics table: each metric (prefixed) and its labels."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("**Metrics**", 1)[1].split("\n\n", 2)[1]
    documented = {}
    for row in table.splitlines()[2:]:
        name, labels = re.match(r"\| `(\w+)` \|([^|]*)\|", row).groups()
        documented["wasm_extproc_" + name] = set(re.findall(r"`(\w+)`", labels))
    return documented


def test_the_dashboard_and_rules_use_only_documented_metrics_and_labels():
    documented = documented_metrics()
    for name in ["streams_total", "plugin_calls_total", "plugin_call_duration_seconds"]:
        assert "wasm_extproc_" + name in documented
    known = {}
    for name, labels in documented.items():
        known[name] = labels
        # Histograms: their buckets carry the bucket's bound.
        known[name + "_bucket"] = labels | {"le"}
    for where, expr in monitoring_queries():
        metrics, labels, grouping = promql_names(expr)
        for metric in metrics:
            assert metric in known, f"{where}: {metric} is not in the README's Metrics table"
        for metric, names in labels.items():
            assert names <= known[metric] | TARGET_LABELS, (where, metric, names)
        available = set().union(*(known[m] for m in metrics)) | TARGET_LABELS
        assert grouping <= available, (where, grouping - available)


def test_the_dashboard_latency_line_is_the_alerts_threshold():
    (alert,) = [r for r in alerting_rules() if r["alert"] == "WasmExtprocLatencyNearMessageTimeout"]
    threshold = float(re.search(r">\s*([0-9.]+)\s*$", alert["expr"]).group(1))
    # 0.8 x the message_timeout the shipped Envoy configuration sets.
    (config,) = load_all(DEPLOY / "envoy" / "envoy.yaml")
    ext_proc = http_connection_manager(config)["http_filters"][0]["typed_config"]
    assert threshold == pytest.approx(0.8 * float(ext_proc["message_timeout"].removesuffix("s")))
    (panel,) = [p for p in dashboard_panels() if p["title"].startswith("Call latency")]
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [step["value"] for step in steps] == [None, threshold]
    assert panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "line"
