// Drives the relay with the Vercel AI SDK (`ai` + `@ai-sdk/openai`'s Responses provider, `store`
// left at its default) in a multi-step tool loop, plain and streamed, and prints what it saw as
// JSON: per mode, the steps, the tool calls, the final text, and the item references the SDK
// itself sent (read from its requests, through a fetch that only looks).
// Usage: node ai_sdk_check.mjs BASE_URL API_KEY MODEL TAG
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, jsonSchema, stepCountIs, streamText, tool } from "ai";

const [baseURL, apiKey, model, tag] = process.argv.slice(2);
const sent = [];
const provider = createOpenAI({
  baseURL,
  apiKey,
  fetch: async (url, init) => {
    if (typeof init?.body === "string") sent.push(JSON.parse(init.body));
    return fetch(url, init);
  },
});

const tools = {
  get_weather: tool({
    description: "The weather in a city.",
    inputSchema: jsonSchema({
      type: "object",
      properties: { city: { type: "string" } },
      required: ["city"],
    }),
    execute: async ({ city }) => `sunny in ${city}`,
  }),
};

const prompt = (mode) =>
  `${tag}-${mode} #sim tool=get_weather args={"city":"Paris"} text=Checking tokens=2`;

function report(result, first) {
  const bodies = sent.slice(first);
  return {
    steps: result.steps.length,
    toolCalls: result.steps.flatMap((step) =>
      step.toolCalls.map((call) => ({ toolName: call.toolName, input: call.input })),
    ),
    text: result.text,
    store: bodies.map((body) => body.store ?? null),
    references: bodies.map((body) =>
      (Array.isArray(body.input) ? body.input : [])
        .filter((item) => item.type === "item_reference")
        .map((item) => item.id),
    ),
  };
}

const out = {};
let first = sent.length;
const plain = await generateText({
  model: provider.responses(model),
  prompt: prompt("plain"),
  tools,
  stopWhen: stepCountIs(5),
  maxRetries: 0,
});
out.plain = report(plain, first);

first = sent.length;
const streamed = streamText({
  model: provider.responses(model),
  prompt: prompt("stream"),
  tools,
  stopWhen: stepCountIs(5),
  maxRetries: 0,
});
await streamed.consumeStream();
out.stream = report(
  { steps: await streamed.steps, text: await streamed.text },
  first,
);

console.log(JSON.stringify(out));
