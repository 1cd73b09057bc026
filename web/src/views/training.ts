import { api, HistoryPoint, localPath, Training, TERMINAL } from "../api";

interface ExportInfo {
  name: string;
  format: string;
  status: "processing" | "succeeded" | "failed";
  error: string | null;
  file: string;
  urls: { download: string };
}
import { lineChart } from "../chart";
import { every, fill, h, View } from "../dom";
import { dataFromStats, dataSummary, duration, eta, evalRows, num, progress, runTime, samples, series, StepClock } from "../format";
import { badge, bar, card, errorBox, kv, message } from "../widgets";
import { POLL_MS } from "./trainings";

const pct = (x: number | null | undefined) => (typeof x === "number" ? `${(x * 100).toFixed(1)}%` : "–");
const lr = (v: number) => (v === 0 ? "0" : v.toExponential(1));

/** One training, live: progress, charts, data summary, samples, evaluation, output, inputs, logs. */
export function trainingView(id: string): View {
  const clock = new StepClock();
  const title = h("div", { class: "title" }, h("h1", null, "Training ", h("span", { class: "mono" }, id)));
  const actions = h("div", { class: "actions" });
  const sub = h("div", { class: "sub" });
  const notice = h("div");
  const progressBox = h("div", { class: "progress-box" });
  const charts = [
    lineChart("loss", "Loss", [{ label: "train", color: "#4f46e5" }, { label: "validation", color: "#f97316", sparse: true }], (v) => num(v, 3)),
    lineChart("lr", "Learning rate", [{ label: "learning rate", color: "#0d9488" }], lr),
    lineChart("tps", "Tokens / s", [{ label: "tokens/s", color: "#db2777" }], (v) => num(Math.round(v))),
  ];
  // Supervised runs: the share of labelled next tokens the model ranks first.
  const accuracyChart = lineChart("token_accuracy", "Token accuracy", [{ label: "train", color: "#16a34a" }, { label: "validation", color: "#f97316", sparse: true }], (v) => num(v, 3));
  accuracyChart.el.hidden = true;
  // DPO runs (method=dpo) only: how often, and by how much, the preferred answer out-scores the other.
  const dpoCharts = [
    lineChart("reward_accuracy", "Reward accuracy", [{ label: "train", color: "#16a34a" }, { label: "validation", color: "#f97316", sparse: true }], (v) => num(v, 2)),
    lineChart("reward_margin", "Reward margin", [{ label: "train", color: "#7c3aed" }, { label: "validation", color: "#f97316", sparse: true }], (v) => num(v, 3)),
  ];
  for (const c of dpoCharts) c.el.hidden = true;
  // GRPO runs (method=grpo) only: the grader's score, how much it varies within a prompt's answers, their length.
  const grpoCharts = [
    lineChart("reward_mean", "Reward (grader score)", [{ label: "train", color: "#16a34a" }, { label: "validation", color: "#f97316", sparse: true }], (v) => num(v, 3)),
    lineChart("reward_spread", "Reward spread", [{ label: "std", color: "#7c3aed" }, { label: "prompts without spread", color: "#dc2626" }], (v) => num(v, 2)),
    lineChart("completion_length", "Answer length (tokens)", [{ label: "mean", color: "#0891b2" }], (v) => num(Math.round(v))),
  ];
  for (const c of grpoCharts) c.el.hidden = true;
  const palette = ["#4f46e5", "#16a34a", "#f97316", "#db2777", "#0d9488", "#a16207"];
  let graderChart: ReturnType<typeof lineChart> | null = null;
  let graderKeys: string[] = [];
  const dataBox = h("div", { "data-section": "data" }, h("p", { class: "muted" }, "Appears once the data is tokenized."));
  const samplesBox = h("div", { "data-section": "samples" });
  const evalCard = h("div");
  const outputCard = h("div");
  const exportsCard = h("div", { "data-section": "exports" });
  let exportsShown = false;
  let exportsTimer: number | undefined;
  const inputsBox = h("div");
  const logs = h("pre", { class: "logs", "data-section": "logs" });
  const follow = h("input", { type: "checkbox", id: "follow", checked: true });
  let shownLogs = "";
  let last: Training | null = null;

  const chartsBox = h("div", { class: "charts" }, [...charts, accuracyChart, ...dpoCharts, ...grpoCharts].map((c) => c.el));
  const el = h(
    "div",
    { class: "page", "data-training": id },
    h("div", { class: "page-head" }, title, actions),
    sub,
    notice,
    card("Progress", progressBox),
    card("Metrics", chartsBox),
    h("div", { class: "two" }, card("Data", dataBox), card("Validation samples", samplesBox)),
    evalCard,
    outputCard,
    exportsCard,
    card("Inputs", inputsBox),
    card(
      h("span", { class: "card-title-row" }, "Logs", h("label", { class: "follow" }, follow, " follow")),
      logs,
    ),
  );

  const cancel = async (button: HTMLButtonElement) => {
    button.disabled = true;
    try {
      render(await api.post<Training>(`/v1/trainings/${id}/cancel`));
    } catch (err) {
      fill(notice, errorBox(err));
      button.disabled = false;
    }
  };

  /** Fetch `path` with the token (a plain link would not send it) and save it as `filename`. */
  const saveBlob = async (path: string, filename: string, button: HTMLButtonElement, busy?: string) => {
    button.disabled = true;
    const label = button.textContent;
    if (busy) button.textContent = busy;
    try {
      const url = URL.createObjectURL(await api.blob(path));
      const a = h("a", { href: url, download: filename });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    } catch (err) {
      fill(notice, errorBox(err));
    } finally {
      button.textContent = label;
      button.disabled = false;
    }
  };

  const download = (button: HTMLButtonElement) =>
    saveBlob(`/v1/trainings/${id}/weights`, `training_output-${id}.zip`, button, "Downloading…");

  const EXPORTS: [string, Record<string, string>][] = [
    ["Merged (bf16)", { format: "merged", dtype: "bf16" }],
    ["GGUF (q8_0)", { format: "gguf", quant: "q8_0" }],
    ["Ollama (q8_0)", { format: "ollama", quant: "q8_0" }],
  ];

  /** The exports card: a button per format, and each export's state or download. */
  const loadExports = async () => {
    window.clearTimeout(exportsTimer);
    let list: ExportInfo[] = [];
    try {
      list = (await api.get<{ results: ExportInfo[] }>(`/v1/trainings/${id}/exports`)).results;
    } catch (err) {
      fill(notice, errorBox(err));
    }
    const start = async (body: Record<string, string>, button: HTMLButtonElement) => {
      button.disabled = true;
      try {
        await api.post(`/v1/trainings/${id}/exports`, body);
      } catch (err) {
        fill(notice, errorBox(err));
      }
      await loadExports();
    };
    fill(
      exportsCard,
      card(
        "Exports",
        h("div", { class: "actions" }, EXPORTS.map(([label, body]) =>
          h("button", { "data-export": body.format, onclick: (e: Event) => start(body, e.currentTarget as HTMLButtonElement) }, label))),
        list.length
          ? kv(list.map((e) => [e.name, e.status === "succeeded"
              ? h("button", { class: "link", "data-download-export": e.name, onclick: (ev: Event) => saveBlob(localPath(e.urls.download), e.file, ev.currentTarget as HTMLButtonElement) }, e.file)
              : e.status === "failed" ? h("span", { class: "error-text" }, `failed: ${e.error ?? ""}`) : h("span", { class: "muted" }, "exporting…")]))
          : h("p", { class: "muted" }, "Merged weights for vLLM or TGI, a GGUF file for llama.cpp, or a GGUF with an Ollama Modelfile; each is checked against the trained model."),
      ),
    );
    if (list.some((e) => e.status === "processing")) exportsTimer = window.setTimeout(loadExports, 3000);
  };

  const render = (t: Training) => {
    last = t;
    const now = Date.now() / 1000;
    const p = progress(t.metrics, t.status);
    clock.observe(t.id, p.step, now);
    const done = TERMINAL.includes(t.status);
    fill(title, h("h1", null, "Training ", h("span", { class: "mono" }, t.id)), badge(t.paused ? "paused" : t.status));
    const playground = t.output?.version
      ? `#/playground?version=${encodeURIComponent(t.output.version)}&compare=${encodeURIComponent(`${t.model}:${t.version}`)}`
      : null;
    fill(
      actions,
      !done && h("button", { class: "danger", "data-action": "cancel", onclick: (e: Event) => cancel(e.currentTarget as HTMLButtonElement) }, "Cancel"),
      t.status === "succeeded" && h("button", { "data-action": "download", onclick: (e: Event) => download(e.currentTarget as HTMLButtonElement) }, "Download weights"),
      playground && h("a", { class: "button primary", href: playground, "data-action": "playground" }, "Try in playground"),
    );
    fill(
      sub,
      h("span", { class: "muted" }, "base "), t.model, h("span", { class: "muted" }, " → "), t.destination,
      h("span", { class: "dot" }, "·"), `created ${t.created_at ? new Date(t.created_at).toLocaleString() : "–"}`,
      h("span", { class: "dot" }, "·"), `ran ${duration(runTime(t, now))}`,
    );
    fill(notice, t.error ? h("div", { class: "error-box", role: "alert" }, t.error) : null);

    const left = eta(t, now, clock.secondsPerStep(t.id));
    const m = t.metrics;
    fill(
      progressBox,
      bar(p.fraction, t.status),
      h(
        "div",
        { class: "stats" },
        stat("step", p.maxSteps ? `${p.step} / ${p.maxSteps}` : String(p.step || "–"), "step"),
        stat("ETA", done ? "–" : left === null ? "–" : duration(left), "eta"),
        stat("loss", num(m.loss), "loss"),
        stat("val loss", num(m.val_loss), "val_loss"),
        stat("learning rate", typeof m.learning_rate === "number" ? lr(m.learning_rate) : "–", "lr"),
        stat("tokens/s", num(typeof m.tokens_per_second === "number" ? Math.round(m.tokens_per_second) : null), "tps"),
      ),
    );

    charts[0].update(series(m.history, ["loss", "val_loss"]));
    charts[1].update(series(m.history, ["learning_rate"]));
    charts[2].update(series(m.history, ["tokens_per_second"]));
    const accuracy = (m.history ?? []).some((p) => typeof p.token_accuracy === "number");
    accuracyChart.el.hidden = !accuracy;
    if (accuracy) accuracyChart.update(series(m.history, ["token_accuracy", "val_token_accuracy"]));
    const dpo = (m.history ?? []).some((p) => typeof p.reward_accuracy === "number");
    for (const c of dpoCharts) c.el.hidden = !dpo;
    if (dpo) {
      dpoCharts[0].update(series(m.history, ["reward_accuracy", "val_reward_accuracy"]));
      dpoCharts[1].update(series(m.history, ["reward_margin", "val_reward_margin"]));
    }
    const grpo = (m.history ?? []).some((p) => typeof p.reward_mean === "number");
    for (const c of grpoCharts) c.el.hidden = !grpo;
    if (grpo) {
      grpoCharts[0].update(series(m.history, ["reward_mean", "val_reward_mean"]));
      grpoCharts[1].update(series(m.history, ["reward_std", "no_spread_share"]));
      grpoCharts[2].update(series(m.history, ["completion_length"]));
      // A multi grader's named graders, one line each (the share the grader failed on is not a grader).
      const keys = [...new Set((m.history ?? []).flatMap((p) => Object.keys(p)))]
        .filter((k) => k.startsWith("grader_") && k !== "grader_failed_share")
        .sort()
        .slice(0, palette.length);
      if (keys.length && keys.join() !== graderKeys.join()) {
        graderChart?.destroy();
        graderChart?.el.remove();
        graderKeys = keys;
        graderChart = lineChart("graders", "Each grader's score",
          keys.map((k, i) => ({ label: k.slice("grader_".length), color: palette[i] })), (v) => num(v, 2));
        chartsBox.append(graderChart.el);
      }
      graderChart?.update(series(m.history, graderKeys as (keyof HistoryPoint)[]));
    }

    const data = dataFromStats(m.data) ?? dataSummary(t.logs);
    if (data) {
      fill(
        dataBox,
        kv([
          ["rows", `${num(data.train_rows)} train, ${num(data.validation_rows)} validation`],
          ["tokens", `${num(data.tokens)} (${num(data.trained_tokens)} trained)`],
          ["sequences", num(data.sequences)],
          ["fill", data.packing_fill === null ? `${pct(1 - data.padding)} (padding ${pct(data.padding)})` : `${pct(data.packing_fill)} packed, padding ${pct(data.padding)}`],
          ["truncated rows", num(data.truncated)],
        ]),
      );
    }

    const found = samples(t.logs);
    const prompt = typeof t.input.validation_prompt === "string" ? t.input.validation_prompt : null;
    fill(
      samplesBox,
      prompt ? h("div", { class: "sample-prompt" }, h("span", { class: "muted" }, "prompt "), h("code", null, prompt)) : null,
      found.length
        ? h("ol", { class: "samples" }, found.map((s) => h("li", { "data-step": String(s.step) }, h("span", { class: "step" }, `step ${s.step}`), h("pre", null, s.output))))
        : h("p", { class: "muted" }, prompt ? "Generated at each validation." : "Set validation_prompt to see generations here."),
    );

    const rows = evalRows(m.eval);
    fill(
      evalCard,
      rows.length
        ? card(
            "Evaluation",
            h(
              "table",
              { class: "eval", "data-section": "eval" },
              h("thead", null, h("tr", null, h("th", null, "metric"), h("th", null, "base"), h("th", null, "tuned"), h("th", null, "change"))),
              h(
                "tbody",
                null,
                rows.map((r) =>
                  h(
                    "tr",
                    null,
                    h("td", null, r.metric),
                    h("td", { class: "mono" }, num(r.base)),
                    h("td", { class: "mono" }, num(r.tuned)),
                    h("td", { class: `mono ${better(r.metric, r.change)}` }, r.change === null ? "–" : `${r.change > 0 ? "+" : ""}${num(r.change)}`),
                  ),
                ),
              ),
            ),
          )
        : null,
    );

    fill(
      outputCard,
      t.output?.version
        ? card(
            "Output",
            kv([
              ["version", h("a", { href: playground ?? "#/playground", class: "mono", "data-output-version": t.output.version }, t.output.version)],
              ["weights", h("button", { class: "link", onclick: (e: Event) => download(e.currentTarget as HTMLButtonElement) }, "training_output.zip")],
              ["runtime", `${duration(Number(m.train_runtime_s))} training, ${duration(Number(m.total_runtime_s))} in all`],
            ]),
          )
        : null,
    );

    if (t.status === "succeeded" && !exportsShown) {
      exportsShown = true;
      void loadExports();
    }

    fill(inputsBox, kv(Object.entries(t.input).map(([k, v]) => [k, h("code", null, typeof v === "string" ? v : JSON.stringify(v))])));

    if (t.logs !== shownLogs) {
      if (t.logs.startsWith(shownLogs)) logs.append(t.logs.slice(shownLogs.length));
      else logs.textContent = t.logs;
      shownLogs = t.logs;
      if (follow.checked) logs.scrollTop = logs.scrollHeight;
    }
  };

  const refresh = async () => {
    if (last && TERMINAL.includes(last.status)) return;
    try {
      render(await api.get<Training>(`/v1/trainings/${id}`));
    } catch (err) {
      fill(notice, errorBox(err));
      if (!last) fill(progressBox, h("p", { class: "muted" }, message(err)));
    }
  };
  const stop = every(POLL_MS, refresh);
  return {
    el,
    destroy() {
      stop();
      window.clearTimeout(exportsTimer);
      [...charts, accuracyChart, ...dpoCharts, ...grpoCharts].forEach((c) => c.destroy());
      graderChart?.destroy();
    },
  };
}

/** "up" for a change for the better (lower loss, perplexity and log-prob of the non-preferred answer,
 * higher scores), "down" for worse. */
function better(metric: string, change: number | null): string {
  if (change === null || change === 0) return "";
  return (/loss|perplexity|non_preferred/.test(metric) ? change < 0 : change > 0) ? "up" : "down";
}

function stat(label: string, value: string, key: string): HTMLElement {
  return h("div", { class: "stat", "data-stat": key }, h("div", { class: "stat-value" }, value), h("div", { class: "stat-label" }, label));
}
