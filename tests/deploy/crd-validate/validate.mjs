// Validate Kubernetes custom resources against their CRD schemas, offline.
//
// The @kubernetes-models packages are generated from the projects' released CRD manifests
// (KEDA's release YAML, Strimzi's strimzi-crds-*.yaml): each model's validate() runs the CRD's
// openAPIV3Schema, compiled to an ajv validator. Unknown fields are not rejected (the API
// server prunes them; kubectl --validate=strict would refuse them).
//
// stdin: a JSON array of objects. stdout: a JSON array, one entry per object:
//   {"kind", "name", "status": "ok" | "invalid" | "unsupported", "message"}
const MODELS = {
  "keda.sh/v1alpha1/ScaledObject": [
    "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject", "ScaledObject"],
  "kafka.strimzi.io/v1beta2/KafkaTopic": [
    "@kubernetes-models/strimzi-kafka-operator/kafka.strimzi.io/v1beta2/KafkaTopic", "KafkaTopic"],
};

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const objects = JSON.parse(Buffer.concat(chunks).toString("utf8"));

const results = [];
for (const object of objects) {
  const key = `${object.apiVersion}/${object.kind}`;
  const entry = { kind: object.kind, name: object.metadata?.name ?? "", status: "ok", message: "" };
  const found = MODELS[key];
  if (found === undefined) {
    entry.status = "unsupported";
    entry.message = `no CRD schema for ${key}`;
  } else {
    const module = await import(found[0]);
    try {
      new module[found[1]](object).validate();
    } catch (error) {
      entry.status = "invalid";
      entry.message = String(error?.message ?? error);
    }
  }
  results.push(entry);
}
process.stdout.write(JSON.stringify(results));
