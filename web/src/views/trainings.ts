import { api, Page, TrainingSummary } from "../api";
import { every, fill, go, h, View } from "../dom";
import { ago, duration, eta, num, progress, runTime, StepClock } from "../format";
import { badge, bar, errorBox } from "../widgets";

export const POLL_MS = 2000;
const clock = new StepClock();

/** Every training of the caller, newest first, refreshed every 2 s. */
export function trainingsView(): View {
  const body = h("tbody");
  const status = h("div", { class: "status-line" });
  const table = h(
    "table",
    { class: "trainings" },
    h(
      "thead",
      null,
      h("tr", null, ["Status", "Training", "Destination", "Base", "Created", "Duration", "Progress", "ETA", "Loss"].map((c) => h("th", null, c))),
    ),
    body,
  );
  const el = h(
    "div",
    { class: "page" },
    h("div", { class: "page-head" }, h("h1", null, "Trainings"), h("a", { class: "button primary", href: "#/new" }, "New training")),
    status,
    h("div", { class: "table-wrap card flush" }, table),
  );

  const refresh = async () => {
    try {
      const page = await api.get<Page<TrainingSummary>>("/v1/trainings?limit=50&view=summary");
      const now = Date.now() / 1000;
      fill(body, page.results.map((t) => row(t, now)));
      if (!page.results.length) {
        fill(body, h("tr", null, h("td", { colSpan: 9, class: "empty" }, "No trainings yet. ", h("a", { href: "#/new" }, "Start one"), ".")));
      }
      fill(status, `Updated ${new Date().toLocaleTimeString()}`);
    } catch (err) {
      fill(status, errorBox(err));
    }
  };
  return { el, destroy: every(POLL_MS, refresh) };
}

function row(t: TrainingSummary, now: number): HTMLElement {
  const p = progress(t.metrics, t.status);
  clock.observe(t.id, p.step, now);
  const left = eta(t, now, clock.secondsPerStep(t.id));
  const open = (event: Event) => {
    if (!(event.target as Element).closest("a")) go(`#/trainings/${t.id}`);
  };
  return h(
    "tr",
    { class: "clickable", "data-training": t.id, "data-status": t.status, onclick: open },
    h("td", null, badge(t.paused ? "paused" : t.status)),
    h("td", null, h("a", { href: `#/trainings/${t.id}`, class: "mono" }, t.id.slice(0, 10))),
    h("td", null, t.destination),
    h("td", { class: "muted" }, t.model),
    h("td", { title: t.created_at ?? "" }, ago(t.created_at, now)),
    h("td", null, duration(runTime(t, now))),
    h(
      "td",
      { class: "progress-cell" },
      bar(p.fraction, t.status),
      h("span", { class: "steps" }, p.maxSteps ? `${p.step}/${p.maxSteps}` : p.step ? `${p.step}` : ""),
    ),
    h("td", null, left === null ? "–" : duration(left)),
    h("td", { class: "mono" }, num(t.metrics.loss)),
  );
}
