// Validates custom resources against the schemas Istio and Envoy Gateway publish, as packaged
// by @kubernetes-models (the same OpenAPI schemas the CRDs carry). Reads a JSON array of
// resources on stdin; prints one line per resource, "ok <kind> <name>" or
// "invalid <kind> <name>: <why>", and exits 1 if any is invalid.
import { EnvoyFilter } from "@kubernetes-models/istio/networking.istio.io/v1alpha3/EnvoyFilter";
import { DestinationRule } from "@kubernetes-models/istio/networking.istio.io/v1/DestinationRule";
import { VirtualService } from "@kubernetes-models/istio/networking.istio.io/v1/VirtualService";
import { AuthorizationPolicy } from "@kubernetes-models/istio/security.istio.io/v1/AuthorizationPolicy";
import { EnvoyExtensionPolicy } from "@kubernetes-models/envoy-gateway/gateway.envoyproxy.io/v1alpha1/EnvoyExtensionPolicy";

const models = {
  "networking.istio.io/v1alpha3/EnvoyFilter": EnvoyFilter,
  "networking.istio.io/v1/DestinationRule": DestinationRule,
  "networking.istio.io/v1/VirtualService": VirtualService,
  "security.istio.io/v1/AuthorizationPolicy": AuthorizationPolicy,
  "gateway.envoyproxy.io/v1alpha1/EnvoyExtensionPolicy": EnvoyExtensionPolicy,
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
let failed = false;
for (const resource of JSON.parse(input)) {
  const key = `${resource.apiVersion}/${resource.kind}`;
  const name = `${resource.kind} ${resource.metadata?.name}`;
  const Model = models[key];
  if (!Model) {
    console.log(`invalid ${name}: no schema for ${key}`);
    failed = true;
    continue;
  }
  try {
    new Model(resource).validate();
    console.log(`ok ${name}`);
  } catch (error) {
    console.log(`invalid ${name}: ${error.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
