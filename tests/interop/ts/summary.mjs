// Shared by the TypeScript interop clients: the JSON summary line they print, a watchdog, and the
// text of a tool result.

export function start(summary, seconds = 45) {
  summary.ok = false;
  summary.failures = summary.failures ?? [];
  const watchdog = setTimeout(() => {
    summary.failures.push(`timed out after ${seconds}s`);
    finish(summary, 1);
  }, seconds * 1000);
  summary.stop = () => clearTimeout(watchdog);
  return summary;
}

// Prints the summary as one JSON line and exits (non-zero on any failure).
export function finish(summary, code) {
  summary.stop?.();
  delete summary.stop;
  summary.ok = code === 0 && summary.failures.length === 0;
  process.stdout.write(JSON.stringify(summary) + "\n");
  process.exit(summary.ok ? 0 : 1);
}

export function textOf(result) {
  if (result.isError) throw new Error(`tool error: ${JSON.stringify(result)}`);
  return (result.content ?? []).filter((c) => c.type === "text").map((c) => c.text).join("");
}

// `n` concurrent echo calls, each of which must come back with its own text.
export async function concurrentEcho(client, summary, n) {
  const texts = Array.from({ length: n }, (_, i) => `ts-${i}-${Math.random().toString(36).slice(2)}`);
  const answers = await Promise.all(
    texts.map((m) => client.callTool({ name: "echo", arguments: { message: m } }).then(textOf)),
  );
  summary.concurrent.calls = texts.length;
  answers.forEach((a, i) => {
    if (a === `Echo: ${texts[i]}`) summary.concurrent.correct += 1;
    else summary.failures.push(`concurrent call ${i} sent ${texts[i]} got ${a}`);
  });
}
