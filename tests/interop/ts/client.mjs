// TypeScript-SDK interop client for mcp-broker.
//   node client.mjs http://127.0.0.1:PORT/mcp
// Connects with Client + StreamableHTTPClientTransport, lists tools, calls `echo`, then runs 10
// concurrent echo calls and checks each answer is its own. Prints one JSON summary line on stdout;
// exits non-zero on any failure. Must run from a directory whose node_modules has
// @modelcontextprotocol/sdk (the harness copies it to target/interop/node/).
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { concurrentEcho, finish, start, textOf } from "./summary.mjs";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const url = process.argv[2];
if (!url) {
  console.error("usage: node client.mjs URL");
  process.exit(2);
}

const summary = start({
  url,
  protocolVersion: null,
  sessionId: null,
  serverInfo: null,
  tools: [],
  echo: null,
  concurrent: { calls: 0, correct: 0 },
  failures: [],
});

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

  await concurrentEcho(client, summary, 10);

  await transport.terminateSession().catch((e) => summary.failures.push(`DELETE session failed: ${e}`));
  await client.close();
  finish(summary, 0);
} catch (e) {
  summary.failures.push(String(e?.stack ?? e));
  finish(summary, 1);
}
