// TypeScript-SDK stdio interop client for `mcp-broker connect`.
//   node stdio_client.mjs COMMAND [ARGS...]
// Spawns COMMAND (the shim) with StdioClientTransport, as a host does, declaring sampling; lists
// tools, calls `echo`, a long-running tool with progress, and `trigger-sampling-request` answered
// by this client; then 10 concurrent echo calls. Prints one JSON summary line on stdout; exits
// non-zero on any failure. Must run from a directory whose node_modules has
// @modelcontextprotocol/sdk (the harness copies it to target/interop/node/).
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { concurrentEcho, finish, start, textOf } from "./summary.mjs";
import { StdioClientTransport, getDefaultEnvironment } from "@modelcontextprotocol/sdk/client/stdio.js";
import { CreateMessageRequestSchema } from "@modelcontextprotocol/sdk/types.js";

const [command, ...args] = process.argv.slice(2);
if (!command) {
  console.error("usage: node stdio_client.mjs COMMAND [ARGS...]");
  process.exit(2);
}

const summary = start({
  protocolVersion: null,
  serverInfo: null,
  tools: [],
  echo: null,
  progress: [],
  sampled: null,
  sampling: null,
  concurrent: { calls: 0, correct: 0 },
  failures: [],
});

const client = new Client({ name: "mcp-broker-interop-ts-stdio", version: "0.0.0" }, { capabilities: { sampling: {} } });
client.setRequestHandler(CreateMessageRequestSchema, async (req) => {
  summary.sampled = req.params.messages[0]?.content?.text ?? null;
  return { role: "assistant", content: { type: "text", text: "pong from the TS host" }, model: "ts-model" };
});
// XDG_RUNTIME_DIR passes through for on-demand pools (the SDK passes only a safe default set).
const env = { ...getDefaultEnvironment() };
if (process.env.XDG_RUNTIME_DIR) env.XDG_RUNTIME_DIR = process.env.XDG_RUNTIME_DIR;
const transport = new StdioClientTransport({ command, args, env, stderr: "inherit" });

try {
  await client.connect(transport);
  summary.protocolVersion = client.transport?._protocolVersion ?? null;
  summary.serverInfo = client.getServerVersion() ?? null;

  const { tools } = await client.listTools();
  summary.tools = tools.map((t) => t.name);

  summary.echo = textOf(await client.callTool({ name: "echo", arguments: { message: "hello from the TS stdio client" } }));

  const done = textOf(
    await client.callTool({ name: "trigger-long-running-operation", arguments: { duration: 1, steps: 2 } }, undefined, {
      onprogress: (p) => summary.progress.push(p.progress),
    }),
  );
  if (!done.startsWith("Long running operation completed")) summary.failures.push(`long-running answered ${done}`);

  summary.sampling = textOf(
    await client.callTool({ name: "trigger-sampling-request", arguments: { prompt: "ping-ts", maxTokens: 10 } }),
  );

  await concurrentEcho(client, summary, 10);

  await client.close();
  finish(summary, 0);
} catch (e) {
  summary.failures.push(String(e?.stack ?? e));
  finish(summary, 1);
}
