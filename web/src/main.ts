// The dashboard's shell: sign-in gate, navigation, and a hash router over the views.

import "uplot/dist/uPlot.min.css";
import "./style.css";

import { owner, signOut, token } from "./api";
import { fill, go, h, View } from "./dom";
import { newTrainingView } from "./views/new";
import { playgroundView } from "./views/playground";
import { signInView } from "./views/signin";
import { trainingView } from "./views/training";
import { trainingsView } from "./views/trainings";

type Route = [RegExp, (match: RegExpMatchArray, query: URLSearchParams) => View, string];

const ROUTES: Route[] = [
  [/^\/?$/, () => trainingsView(), "trainings"],
  [/^\/trainings\/?$/, () => trainingsView(), "trainings"],
  [/^\/trainings\/([A-Za-z0-9]+)$/, (m) => trainingView(m[1]), "trainings"],
  [/^\/new$/, () => newTrainingView(), "new"],
  [/^\/playground$/, (_m, q) => playgroundView(q.get("version"), q.get("compare")), "playground"],
];

const root = document.getElementById("app") as HTMLElement;
let current: View | null = null;

function nav(active: string): HTMLElement {
  const link = (href: string, key: string, text: string) =>
    h("a", { href, class: key === active ? "active" : "", "data-nav": key }, text);
  return h(
    "header",
    { class: "top" },
    h("a", { class: "brand", href: "#/" }, h("span", { class: "logo" }), "tunery"),
    h("nav", null, link("#/", "trainings", "Trainings"), link("#/new", "new", "New training"), link("#/playground", "playground", "Playground")),
    h(
      "div",
      { class: "who" },
      h("span", { class: "owner", "data-owner": owner() }, owner()),
      h("button", { class: "link", onclick: () => { signOut(); render(); } }, "Sign out"),
    ),
  );
}

function render(): void {
  current?.destroy();
  current = null;
  if (!token()) {
    current = signInView(() => render());
    fill(root, current.el);
    return;
  }
  const [path, search] = location.hash.replace(/^#/, "").split("?");
  for (const [re, make, key] of ROUTES) {
    const match = path.match(re);
    if (match) {
      current = make(match, new URLSearchParams(search ?? ""));
      fill(root, nav(key), h("main", null, current.el));
      return;
    }
  }
  fill(root, nav(""), h("main", null, h("p", { class: "empty" }, "No such page. ", h("a", { href: "#/" }, "Back to the trainings"))));
}

window.addEventListener("hashchange", render);
window.addEventListener("tunery:signed-out", () => go("#/"));
render();
