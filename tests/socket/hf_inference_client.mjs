// Drives a tgi-compat server with @huggingface/inference 4.x, as a user's code would:
//   node hf_inference_client.mjs <base url>
// Prints one JSON object with what each call returned (or the error it threw).
import { InferenceClient } from "@huggingface/inference";

const client = new InferenceClient("", { endpointUrl: process.argv[2] });
const out = {};

async function attempt(name, fn) {
  try {
    out[name] = await fn();
  } catch (e) {
    out[name] = { error: String(e && e.message ? e.message : e) };
  }
}

await attempt("textGeneration", async () =>
  await client.textGeneration({ inputs: "My name is", parameters: { max_new_tokens: 8, seed: 7, temperature: 0.5 } }));

await attempt("textGenerationStream", async () => {
  const chunks = [];
  for await (const chunk of client.textGenerationStream({ inputs: "My name is", parameters: { max_new_tokens: 8, seed: 7, temperature: 0.5 } })) {
    chunks.push(chunk);
  }
  return chunks;
});

await attempt("chatCompletion", async () =>
  await client.chatCompletion({ messages: [{ role: "user", content: "Hello" }], max_tokens: 8, seed: 7 }));

await attempt("chatCompletionStream", async () => {
  const chunks = [];
  for await (const chunk of client.chatCompletionStream({ messages: [{ role: "user", content: "Hello" }], max_tokens: 8, seed: 7 })) {
    chunks.push(chunk);
  }
  return chunks;
});

await attempt("chatCompletionError", async () =>
  await client.chatCompletion({ messages: [{ role: "user", content: "Hello" }], max_tokens: 8, temperature: -1 }));

console.log(JSON.stringify(out));
