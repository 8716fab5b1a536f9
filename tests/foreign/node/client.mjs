// A Flow Oracle client written from proto/floworacle/v1/oracle.proto alone, with the standard
// Node.js gRPC stack (@grpc/grpc-js + @grpc/proto-loader, which brings protobufjs). It reads a JSON
// plan on stdin ({address, proto, calls: [...]}) and writes what the server answered as JSON on
// stdout: tensors as {dtype, shape, data: base64}, so the Python test can compare bytes.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import path from "node:path";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const require = createRequire(import.meta.url);
const LOAD = { keepCase: true, longs: String, enums: String, defaults: false, oneofs: true };

function load(file, includeDirs) {
  return grpc.loadPackageDefinition(protoLoader.loadSync(file, { ...LOAD, includeDirs }));
}

function tensorIn(t) {
  return { dtype: t.dtype, shape: t.shape, data: Buffer.from(t.data, "base64") };
}

function tensorOut(t) {
  return t ? { dtype: t.dtype, shape: (t.shape || []).map(String), data: Buffer.from(t.data || []).toString("base64") } : null;
}

function message(fields) {
  // every object with a "data" key is a tensor; everything else is copied as is
  const out = {};
  for (const [k, v] of Object.entries(fields)) {
    if (v && typeof v === "object" && !Array.isArray(v) && "data" in v) out[k] = tensorIn(v);
    else if (v && typeof v === "object" && !Array.isArray(v)) out[k] = message(v);
    else out[k] = v;
  }
  return out;
}

function answer(obj) {
  const out = {};
  for (const [k, v] of Object.entries(obj || {})) {
    if (v && typeof v === "object" && "data" in v && "dtype" in v) out[k] = tensorOut(v);
    else if (v && typeof v === "object" && !Buffer.isBuffer(v) && !Array.isArray(v)) out[k] = answer(v);
    else out[k] = v;
  }
  return out;
}

const unary = (client, method, req) =>
  new Promise((resolve) =>
    client[method](req, { deadline: Date.now() + 60000 }, (err, resp) =>
      resolve(err ? { error: { code: err.code, details: err.details } } : { ok: answer(resp) }),
    ),
  );

function stream(client, reqs) {
  return new Promise((resolve) => {
    const got = [];
    const call = client.OracleStream({ deadline: Date.now() + 60000 });
    call.on("data", (m) => got.push(answer(m)));
    call.on("error", (err) => resolve({ error: { code: err.code, details: err.details }, got }));
    call.on("end", () => resolve({ ok: got }));
    for (const r of reqs) call.write(r);
    call.end();
  });
}

function reflect(address, protoDir) {
  const file = path.join(protoDir, "grpc/reflection/v1alpha/reflection.proto");
  const pkg = load(file, [protoDir]);
  const client = new pkg.grpc.reflection.v1alpha.ServerReflection(address, grpc.credentials.createInsecure());
  return new Promise((resolve) => {
    const out = { services: [], descriptors: 0 };
    const call = client.ServerReflectionInfo();
    call.on("data", (m) => {
      if (m.list_services_response) out.services = m.list_services_response.service.map((s) => s.name);
      if (m.file_descriptor_response) out.descriptors += m.file_descriptor_response.file_descriptor_proto.length;
      if (m.error_response) out.error = m.error_response.error_message;
    });
    call.on("error", (err) => resolve({ error: err.details }));
    call.on("end", () => resolve(out));
    call.write({ list_services: "*" });
    call.write({ file_containing_symbol: "floworacle.v1.FlowOracle" });
    call.end();
  });
}

async function main() {
  const plan = JSON.parse(readFileSync(0, "utf8"));
  const pkg = load(plan.proto, [path.dirname(path.dirname(path.dirname(plan.proto)))]);
  const creds = grpc.credentials.createInsecure();
  const client = new pkg.floworacle.v1.FlowOracle(plan.address, creds, { "grpc.max_receive_message_length": -1 });
  const results = [];
  for (const c of plan.calls) {
    if (c.kind === "stream") results.push(await stream(client, c.requests.map(message)));
    else if (c.kind === "health") {
      const healthProto = path.join(path.dirname(require.resolve("grpc-health-check/package.json")), "proto/health/v1/health.proto");
      const h = load(healthProto, []);
      const hc = new h.grpc.health.v1.Health(plan.address, creds);
      results.push(await unary(hc, "Check", { service: c.service }));
    } else if (c.kind === "reflection") {
      const dir = path.join(path.dirname(require.resolve("@grpc/reflection/package.json")), "build/proto");
      results.push(await reflect(plan.address, dir));
    } else results.push(await unary(client, c.method, message(c.request || {})));
  }
  const versions = {};
  for (const name of ["@grpc/grpc-js", "@grpc/proto-loader", "protobufjs"]) {
    versions[name] = JSON.parse(readFileSync(require.resolve(`${name}/package.json`), "utf8")).version;
  }
  process.stdout.write(JSON.stringify({ versions, results }));
  client.close();
}

main().catch((e) => {
  process.stderr.write(String(e && e.stack ? e.stack : e));
  process.exit(1);
});
