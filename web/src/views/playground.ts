import { allModels, api, localPath, Page, Prediction, streamEvents, Version } from "../api";
import { fill, h, View } from "../dom";
import { fields, parseValue } from "../format";
import { card, errorBox, fieldInput, FieldInput, message } from "../widgets";

interface Choice {
  ref: string; // owner/name:version
  label: string;
  version: Version;
}

interface Pane {
  el: HTMLElement;
  select: HTMLSelectElement;
  run(input: Record<string, unknown>): Promise<void>;
  /** Cancel the running prediction (its stream then ends as canceled); `leave` also drops the stream. */
  stop(leave?: boolean): void;
}

/** Run one version, or two side by side, on the same prompt, and watch the tokens stream. */
export function playgroundView(initial: string | null, compare: string | null): View {
  const top = h("div");
  const form = h("form", { class: "playground" });
  const el = h("div", { class: "page" }, h("div", { class: "page-head" }, h("h1", null, "Playground")), top, form);
  const prompt = h("textarea", { id: "prompt", name: "prompt", rows: 5, placeholder: "Text to continue, used verbatim…" });
  const compareBox = h("input", { type: "checkbox", id: "compare", checked: Boolean(compare) });
  const runButton = h("button", { type: "submit", class: "primary", id: "run" }, "Run");
  const stopButton = h("button", { type: "button", id: "stop", disabled: true }, "Stop");
  const error = h("div");
  let params: FieldInput[] = [];
  const panes: Pane[] = [];

  const load = async (): Promise<Choice[]> => {
    const choices: Choice[] = [];
    for (const m of await allModels()) {
      if (!m.latest_version) continue;
      const versions = m.is_official
        ? [m.latest_version]
        : (await api.get<Page<Version>>(`/v1/models/${m.owner}/${m.name}/versions?limit=100`)).results;
      versions.forEach((v, i) =>
        choices.push({
          ref: `${m.owner}/${m.name}:${v.id}`,
          label: `${m.owner}/${m.name} · ${v.id.slice(0, 8)}${m.is_official ? " (base)" : i === 0 ? " (latest)" : ""}`,
          version: v,
        }),
      );
    }
    return choices;
  };

  const pane = (choices: Choice[], selected: string | null, name: string): Pane => {
    const select = h(
      "select",
      { id: `version-${name}`, name: `version-${name}` },
      choices.map((c) => h("option", { value: c.ref, selected: c.ref === selected }, c.label)),
    );
    const output = h("pre", { class: "output", "data-output": name });
    const stats = h("div", { class: "pane-stats muted" });
    const status = h("span", { class: "pane-status" });
    let controller: AbortController | null = null;
    let predictionId: string | null = null;
    const elp = h("section", { class: "card pane", "data-pane": name }, h("div", { class: "pane-head" }, select, status), output, stats);
    return {
      el: elp,
      select,
      async run(input) {
        controller?.abort();
        controller = new AbortController();
        output.textContent = "";
        elp.dataset.state = "running";
        fill(status, h("span", { class: "badge processing" }, "running"));
        fill(stats);
        const t0 = performance.now();
        let first: number | null = null;
        let pieces = 0;
        let failure: string | null = null;
        try {
          const p = await api.post<Prediction & { urls: { stream: string } }>("/v1/predictions", { version: select.value, input, stream: true });
          predictionId = p.id;
          for await (const event of streamEvents(localPath(p.urls.stream), controller.signal)) {
            if (event.event === "output") {
              first ??= performance.now();
              pieces += 1;
              output.append(event.data);
              fill(stats, `${pieces} pieces · first after ${Math.round(first - t0)} ms`);
            } else if (event.event === "error") {
              failure = JSON.parse(event.data).detail ?? event.data;
            } else if (event.event === "done") {
              const reason = event.data ? JSON.parse(event.data).reason : undefined;
              if (reason === "canceled") failure ??= "canceled";
              break;
            }
          }
          const done = await api.get<Prediction>(`/v1/predictions/${p.id}`);
          const secs = (performance.now() - t0) / 1000;
          fill(
            stats,
            `${pieces} pieces · first after ${first === null ? "–" : `${Math.round(first - t0)} ms`} · ${secs.toFixed(1)} s` +
              (done.metrics.predict_time ? ` (model ${done.metrics.predict_time.toFixed(2)} s)` : ""),
          );
          const state = failure === "canceled" ? "canceled" : failure ? "failed" : done.status;
          elp.dataset.state = state;
          fill(status, h("span", { class: `badge ${state}` }, state), failure && failure !== "canceled" ? h("span", { class: "field-error" }, ` ${failure}`) : null);
        } catch (err) {
          elp.dataset.state = "failed";
          fill(status, controller.signal.aborted ? h("span", { class: "badge canceled" }, "stopped") : errorBox(err));
        } finally {
          predictionId = null;
        }
      },
      stop(leave = false) {
        if (predictionId) void api.post(`/v1/predictions/${predictionId}/cancel`).catch(() => undefined);
        if (leave) controller?.abort();
      },
    };
  };

  const renderParams = (choices: Choice[], ref: string) => {
    const schema = choices.find((c) => c.ref === ref)?.version.openapi_schema.components.schemas.Input;
    params = fields(schema).filter((f) => f.name !== "prompt").map((f) => fieldInput(f));
    return params.map((p) => p.row);
  };

  const run = async (event: Event) => {
    event.preventDefault();
    fill(error);
    const input: Record<string, unknown> = { prompt: prompt.value };
    try {
      if (!prompt.value.trim()) throw new Error("Enter a prompt.");
      for (const p of params) {
        const value = parseValue(p.field, p.raw());
        if (value !== undefined) input[p.field.name] = value;
      }
    } catch (err) {
      return fill(error, errorBox(message(err)));
    }
    runButton.disabled = true;
    stopButton.disabled = false;
    const active = compareBox.checked ? panes : panes.slice(0, 1);
    try {
      await Promise.all(active.map((p) => p.run(input)));
    } finally {
      runButton.disabled = false;
      stopButton.disabled = true;
    }
  };

  (async () => {
    try {
      const choices = await load();
      if (!choices.length) return fill(top, h("p", { class: "empty" }, "No model versions yet."));
      const a = initial && choices.some((c) => c.ref === initial) ? initial : choices[0].ref;
      const base = choices.find((c) => c.label.endsWith("(base)"))?.ref ?? choices[0].ref;
      const b = compare && choices.some((c) => c.ref === compare) ? compare : base;
      panes.push(pane(choices, a, "a"), pane(choices, b, "b"));
      const paneBox = h("div", { class: "panes" }, panes[0].el, panes[1].el);
      const sync = () => paneBox.classList.toggle("single", !compareBox.checked);
      compareBox.addEventListener("change", sync);
      sync();
      fill(
        form,
        card(
          null,
          h("div", { class: "field" }, h("label", { for: "prompt" }, "prompt"), prompt),
          h("details", { class: "sampling", open: true }, h("summary", null, "Sampling"), h("div", { class: "grid four" }, renderParams(choices, a))),
          h("div", { class: "submit-row" }, runButton, stopButton, h("label", { class: "check" }, compareBox, " compare two versions side by side"), error),
        ),
        paneBox,
      );
    } catch (err) {
      fill(top, errorBox(`Could not load the models: ${message(err)}`));
    }
  })();

  form.addEventListener("submit", run);
  stopButton.addEventListener("click", () => panes.forEach((p) => p.stop()));
  return { el, destroy: () => panes.forEach((p) => p.stop(true)) };
}
