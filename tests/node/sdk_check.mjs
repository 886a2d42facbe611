// Drives the relay with the official OpenAI Node SDK and prints what it saw as JSON.
// Usage: node sdk_check.mjs BASE_URL API_KEY
import OpenAI from "openai";

const [baseURL, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const out = {};

const chat = await client.chat.completions.create({
  model: "deepseek-chat",
  messages: [{ role: "user", content: "hi #sim tokens=4" }],
});
out.chat = chat.choices[0].message.content;

const stream = await client.chat.completions.create({
  model: "deepseek-chat",
  messages: [{ role: "user", content: "hi #sim tokens=3" }],
  stream: true,
  stream_options: { include_usage: true },
});
out.chatStream = "";
for await (const chunk of stream) {
  if (chunk.usage) out.chatStreamUsage = chunk.usage.completion_tokens;
  for (const choice of chunk.choices) out.chatStream += choice.delta.content ?? "";
}

const response = await client.responses.create({ model: "gpt-5.5", input: "hi #sim tokens=2" });
out.responses = response.output_text;

const events = await client.responses.create({
  model: "gpt-5.5", input: "hi #sim tokens=2 reasoning=1", stream: true,
});
out.responsesEvents = [];
for await (const event of events) out.responsesEvents.push(event.type);

try {
  await client.chat.completions.create({ model: "nope", messages: [{ role: "user", content: "x" }] });
} catch (error) {
  out.notFound = { status: error.status, code: error.code };
}
console.log(JSON.stringify(out));
