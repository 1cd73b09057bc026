import { signIn } from "../api";
import { h, View } from "../dom";
import { message } from "../widgets";

/** Ask for an API token; keep it for this tab only once GET /v1/account accepts it. */
export function signInView(done: () => void): View {
  const input = h("input", { type: "password", id: "token", name: "token", autocomplete: "off", placeholder: "r8_… or your tunery token", required: true });
  const error = h("div", { class: "field-error", role: "alert" });
  const button = h("button", { type: "submit", class: "primary" }, "Sign in");
  const form = h(
    "form",
    {
      class: "signin card",
      onsubmit: async (event: Event) => {
        event.preventDefault();
        button.disabled = true;
        error.textContent = "";
        try {
          await signIn(input.value);
          done();
        } catch (err) {
          error.textContent = message(err).startsWith("You did not pass") ? "That token was not accepted." : message(err);
          button.disabled = false;
        }
      },
    },
    h("div", { class: "brand big" }, h("span", { class: "logo" }), "tunery"),
    h("h1", null, "Sign in"),
    h("label", { for: "token" }, "API token"),
    input,
    error,
    button,
    h(
      "p",
      { class: "help" },
      "Create one on the server with ",
      h("code", null, "tunery tokens create --owner NAME"),
      ". It is kept in this browser tab only and sent to this server's /v1 API.",
    ),
  );
  queueMicrotask(() => input.focus());
  return { el: h("div", { class: "signin-page" }, form), destroy() {} };
}
