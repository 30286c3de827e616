// TypeScript-SDK interop client for mcp-broker.
//   node client.mjs http://127.0.0.1:PORT/mcp
// Connects with Client + StreamableHTTPClientTransport, lists tools, calls `echo`, then runs 10
// concurrent echo calls and checks each answer is its own. Prints one JSON summary line on stdout;
// exits non-zero on any failure. Must run from a directory whose node_modules has
// @modelcontextprotocol/sdk (the harness copies it to target/interop/node/).
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const url = process.argv[2];
if (!url) {
  console.error("usage: node client.mjs URL");
  process.exit(2);
}

const summary = {
  ok: false,
  url,
  protocolVersion: null,
  sessionId: null,
  serverInfo: null,
  tools: [],
  echo: null,
  concurrent: { calls: 0, correct: 0 },
  failures: [],
};

const watchdog = setTimeout(() => {
  summary.failures.push("timed out after 45s");
  finish(1);
}, 45_000);

function finish(code) {
  clearTimeout(watchdog);
  summary.ok = code === 0 && summary.failures.length === 0;
  process.stdout.write(JSON.stringify(summary) + "\n");
  process.exit(summary.ok ? 0 : 1);
}

function textOf(result) {
  if (result.isError) throw new Error(`tool error: ${JSON.stringify(result)}`);
  return (result.content ?? []).filter((c) => c.type === "text").map((c) => c.text).join("");
}

const client = new Client({ name: "mcp-broker-interop-ts", version: "0.0.0" });
const transport = new StreamableHTTPClientTransport(new URL(url));

try {
  await client.connect(transport);
  summary.protocolVersion = transport.protocolVersion ?? null;
  summary.sessionId = transport.sessionId ?? null;
  summary.serverInfo = client.getServerVersion() ?? null;

  const { tools } = await client.listTools();
  summary.tools = tools.map((t) => t.name);
  if (!summary.tools.includes("echo")) summary.failures.push(`no echo tool in ${summary.tools}`);

  summary.echo = textOf(await client.callTool({ name: "echo", arguments: { message: "hello from the TypeScript SDK" } }));
  if (summary.echo !== "Echo: hello from the TypeScript SDK") summary.failures.push(`echo answered ${JSON.stringify(summary.echo)}`);

  const texts = Array.from({ length: 10 }, (_, i) => `ts-${i}-${Math.random().toString(36).slice(2)}`);
  const answers = await Promise.all(
    texts.map((m) => client.callTool({ name: "echo", arguments: { message: m } }).then(textOf)),
  );
  summary.concurrent.calls = texts.length;
  answers.forEach((a, i) => {
    if (a === `Echo: ${texts[i]}`) summary.concurrent.correct += 1;
    else summary.failures.push(`concurrent call ${i} sent ${texts[i]} got ${a}`);
  });

  await transport.terminateSession().catch((e) => summary.failures.push(`DELETE session failed: ${e}`));
  await client.close();
  finish(0);
} catch (e) {
  summary.failures.push(String(e?.stack ?? e));
  finish(1);
}
