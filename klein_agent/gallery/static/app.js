// The klein-agent gallery page: cards, lineage, the full picture, a compare view, live updates.
// Plain JavaScript, no dependencies. Every string from the JSON is hostile (a hand-edited database can hold any
// text): it is only ever set as textContent or an attribute, never as HTML; it enters a selector only through
// CSS.escape (byId) and a URL only through encodeURIComponent (fileUrl).
"use strict";

(() => {
  const PAGE = 60;
  const state = {
    session: null, // null: all images, newest first, grouped by session; a name: that session's lineage tree
    standing: null, // "pick": only the images whose standing verdict is a pick (#picks), else null
    cards: new Map(), // id -> card JSON, every card loaded so far
    groups: new Map(), // all images: session ("" for none) -> its <section>, one per session
    children: new Map(), // id -> ids of loaded images made from it
    cursor: null,
    done: false,
    loading: null,
    newest: undefined,
    // Verdicts: `verdictMark` is how far this view's cards are up to date (the lowest mark a load of them
    // read before their verdicts; undefined while loading), `headMark` the store's newest, from /events.
    verdictMark: undefined,
    headMark: undefined,
    syncing: false,
    syncAgain: false,
    picked: [],
    blink: null,
    view: 0, // bumped by each new view, so a late answer for the last one is dropped
  };
  const $ = (selector) => document.querySelector(selector);
  // the cards (and the detail view) of one image, whatever characters its id holds
  const byId = (id, inner = "") => document.querySelectorAll(`.card[data-image-id="${CSS.escape(id)}"] ${inner}`);
  const fileUrl = (folder, id, suffix) => `${folder}/${encodeURIComponent(id)}${suffix}`;

  // ---- small helpers -------------------------------------------------------------------------------------

  function el(tag, attrs, ...kids) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const kid of kids) if (kid !== null && kid !== undefined) node.append(kid);
    return node;
  }

  async function getJSON(url) {
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  }

  const shortId = (id) => id.slice(0, 10) + "…";
  const when = (unix) => new Date(unix * 1000).toLocaleString();
  const ms = (value) => (value >= 10000 ? `${(value / 1000).toFixed(1)} s` : `${Math.round(value)} ms`);
  const sessionName = (session) => (session === null ? "no session" : session);
  const toolLabel = (tool) => (tool === "import" ? "imported reference" : tool);
  const TOOLS = new Set(["generate", "edit", "compose", "inpaint", "import"]); // those with a colour of their own
  const toolClass = (tool) => `tool-${TOOLS.has(tool) ? tool : "other"}`;

  function thumbSize(card, edge) {
    const scale = Math.min(1, edge / Math.max(card.width, card.height));
    return [Math.max(1, Math.round(card.width * scale)), Math.max(1, Math.round(card.height * scale))];
  }

  function remember(card) {
    if (state.cards.has(card.id)) return false;
    state.cards.set(card.id, card);
    for (const parent of card.parents) {
      if (!state.children.has(parent)) state.children.set(parent, []);
      const list = state.children.get(parent);
      if (!list.includes(card.id)) list.push(card.id);
      const at = (x) => (state.cards.has(x) ? state.cards.get(x).created_at : 0); // one unpicked off #picks: gone
      list.sort((x, y) => at(x) - at(y)); // oldest first
      for (const node of byId(parent, ".made-into")) {
        fillChips(node, "made into", list);
      }
    }
    return true;
  }

  // ---- cards ---------------------------------------------------------------------------------------------

  function chip(id) {
    const thumb = el("img", { src: fileUrl("thumb", id, ".webp"), alt: "", loading: "lazy", width: 24, height: 24 });
    thumb.addEventListener("error", () => thumb.remove()); // an evicted (or damaged) parent: its id alone
    return el("a", { class: "chip", href: `#image=${encodeURIComponent(id)}`, "data-ref": id, title: id }, thumb, el("code", { text: shortId(id) }));
  }

  function fillChips(node, label, ids) {
    node.replaceChildren();
    if (!ids.length) return;
    node.append(el("span", { class: "label", text: label }), ...ids.map(chip));
  }

  function facts(card) {
    const items = [];
    if (card.seed !== null) items.push(["seed", `seed ${card.seed}`]);
    items.push(["size", `${card.width}×${card.height}`]);
    if (card.model) items.push(["model", card.variant && card.variant !== card.model ? `${card.model} (${card.variant})` : card.model]);
    if (card.steps !== null) items.push(["steps", `${card.steps} steps`]);
    if (card.guidance !== null) items.push(["guidance", `guidance ${card.guidance}`]);
    items.push(["made", when(card.created_at)]);
    if (card.elapsed_ms !== null) items.push(["elapsed", ms(card.elapsed_ms)]);
    return el("ul", { class: "facts" }, ...items.map(([key, text]) => el("li", { class: key, text })));
  }

  function renderCard(card) {
    const [w, h] = thumbSize(card, 320);
    const picked = state.picked.includes(card.id);
    const node = el(
      "article",
      {
        class: `card ${toolClass(card.tool)}${card.verdict ? ` verdict-${card.verdict}` : ""}`,
        "data-image-id": card.id,
        "data-parents": JSON.stringify(card.parents), // an id may hold spaces
        "data-session": card.session === null ? "" : card.session,
        "data-tool": card.tool,
      },
      el(
        "button",
        { class: "thumb", type: "button", title: `Open ${card.id}`, "data-open": card.id },
        el("img", { src: fileUrl("thumb", card.id, ".webp"), alt: card.prompt || card.source || card.id, width: w, height: h, loading: "lazy", decoding: "async" }),
      ),
    );
    // the tool and the compare box on one line, the whole id under them (it wraps rather than being cut)
    const head = el(
      "div",
      { class: "head" },
      // a card's badge is short, so the compare box stays on its line; the detail view says "imported reference"
      el("span", { class: "tool", title: toolLabel(card.tool), text: card.tool === "import" ? "reference" : card.tool }),
      el("label", { class: "pick" }, el("input", { type: "checkbox", "data-pick": card.id, checked: picked }), "compare"),
      el("code", { class: "id", title: card.id, text: card.id }),
    );
    const text = card.tool === "import" ? `from ${card.source || "an outside image"}` : card.prompt || "";
    const from = el("div", { class: "from" });
    const into = el("div", { class: "made-into" });
    fillChips(from, "from", card.parents);
    fillChips(into, "made into", state.children.get(card.id) || []);
    node.append(el("div", { class: "meta" }, verdicts(card), head, el("p", { class: "prompt", title: text, text }), facts(card), el("div", { class: "lineage" }, from, into)));
    return node;
  }

  // What the agent (record_verdict) decided, under the picture: the standing pick or reject with its reason, then
  // the newest notes. Null when there is nothing to show.
  function verdicts(card) {
    if (!card.verdict && !card.notes.length) return null;
    const box = el("div", { class: "verdicts" });
    if (card.verdict) {
      const label = card.verdict === "pick" ? "★ Picked" : "✕ Rejected";
      box.append(el("p", { class: `standing standing-${card.verdict}`, title: `${label} ${when(card.verdict_at)}` }, el("strong", { text: label }), card.verdict_reason ? `: ${card.verdict_reason}` : ""));
    }
    for (const note of card.notes) box.append(el("p", { class: "note", title: "note", text: note }));
    return box;
  }

  // ---- all images: one group per session, the most recently active session first; newest first in each -------
  // Two agents at work at once store images in turn; a group per run of one session would split each session
  // into rows of one card. An older page's cards join their session's group (at its end); a live new card goes
  // to the top of its group, and the group to the top of the page.

  function groupOf(session) {
    const name = session === null ? "" : session;
    if (!state.groups.has(name)) {
      const heading = el("h2", {}, session === null ? el("span", { text: "no session" }) : el("a", { href: `#session=${encodeURIComponent(name)}`, text: session }));
      state.groups.set(name, el("section", { class: "group", "data-session": name }, heading, el("div", { class: "grid" })));
    }
    return state.groups.get(name);
  }

  function append(cards) {
    const root = $("#cards");
    for (const card of cards) {
      if (!remember(card)) continue;
      const group = groupOf(card.session);
      if (!group.isConnected) root.append(group); // a session first seen on this page is older than those above
      group.querySelector(".grid").append(renderCard(card));
    }
  }

  function prepend(cards) {
    const root = $("#cards");
    for (const card of [...cards].reverse()) {
      if (!remember(card)) continue;
      const group = groupOf(card.session);
      if (root.firstElementChild !== group) root.prepend(group);
      group.querySelector(".grid").prepend(renderCard(card));
    }
  }

  async function loadMore() {
    if (state.done || state.loading) return state.loading;
    const params = new URLSearchParams({ limit: String(PAGE) });
    if (state.cursor) params.set("cursor", state.cursor);
    if (state.standing) params.set("standing", state.standing);
    const view = state.view;
    state.loading = getJSON(`api/images?${params}`)
      .then((page) => {
        if (view !== state.view) return;
        append(page.images);
        lowerMark(page.verdict_mark);
        state.cursor = page.next_cursor;
        state.done = !page.next_cursor;
        if (state.newest === undefined) state.newest = page.images.length ? page.images[0].id : null;
        $("#load-more").hidden = state.done;
        $("#empty").hidden = state.cards.size > 0;
      })
      .finally(() => {
        if (view === state.view) state.loading = null;
      });
    return state.loading;
  }

  async function showAll() {
    reset();
    const picks = state.standing === "pick";
    $("#view-head").replaceChildren(
      el("h2", { text: picks ? "Picked images, newest first" : "All images, newest first" }),
      el("p", { class: "filter" }, picks ? el("a", { href: "#", text: "Show all images" }) : el("a", { href: "#picks", class: "picks-link", text: "★ Show only the picks" })),
    );
    $("#empty").textContent = picks ? "No picks yet: the agent marks its choices with record_verdict." : "No images yet. They appear here as the agent makes them.";
    await loadMore();
    markReady();
  }

  // ---- one session: its lineage as an indented tree, oldest first --------------------------------------------

  async function showSession(session) {
    reset();
    const view = state.view;
    const cards = [];
    let cursor = null;
    let mark;
    do {
      const params = new URLSearchParams({ session, limit: "100" }); // the API's most (rules/limits.py MAX_LIST_LIMIT)
      if (cursor) params.set("cursor", cursor);
      const page = await getJSON(`api/images?${params}`);
      cards.push(...page.images);
      mark = mark === undefined ? page.verdict_mark : Math.min(mark, page.verdict_mark);
      cursor = page.next_cursor;
    } while (cursor && view === state.view);
    if (view !== state.view) return;
    cards.reverse(); // oldest first: the path reads downwards
    for (const card of cards) remember(card);
    state.newest = cards.length ? cards[cards.length - 1].id : null;
    const here = new Set(cards.map((card) => card.id));
    const under = new Map();
    const roots = [];
    for (const card of cards) {
      const parent = card.parents.find((id) => here.has(id)); // under its first parent in this session
      if (parent === undefined) roots.push(card);
      else {
        if (!under.has(parent)) under.set(parent, []);
        under.get(parent).push(card);
      }
    }
    // One line of work reads downwards: after an image comes the image made from it that led furthest (on a
    // tie, the newest). The other images made from it are branches, indented right under it.
    const reach = new Map();
    const size = (card) => {
      if (!reach.has(card.id)) reach.set(card.id, 1 + (under.get(card.id) || []).reduce((sum, kid) => sum + size(kid), 0));
      return reach.get(card.id);
    };
    const line = (start) => {
      const items = [];
      for (let card = start; card; ) {
        const item = el("li", { class: "node" }, renderCard(card));
        items.push(item);
        const kids = under.get(card.id) || [];
        const main = kids.reduce((best, kid) => (best === null || size(kid) >= size(best) ? kid : best), null);
        const branches = kids.filter((kid) => kid !== main);
        if (branches.length) item.append(el("ol", { class: "tree branch" }, ...branches.flatMap(line)));
        card = main;
      }
      return items;
    };
    $("#view-head").replaceChildren(
      el("h2", { text: `Session ${session}` }),
      el("p", { class: "hint", text: `${cards.length} images, oldest first. An image made from another follows it; other images made from that same one are indented under it as branches.` }),
    );
    $("#cards").replaceChildren(el("ol", { class: "tree root" }, ...roots.flatMap(line)));
    $("#empty").hidden = cards.length > 0;
    $("#load-more").hidden = true;
    lowerMark(mark);
    markReady();
  }

  function reset() {
    state.view += 1;
    state.loading = null;
    state.cards.clear();
    state.children.clear();
    state.groups.clear();
    state.cursor = null;
    state.done = false;
    state.newest = undefined;
    state.verdictMark = undefined;
    $("#cards").replaceChildren();
    $("#fresh").hidden = true;
    $("#load-more").hidden = true;
  }

  function markReady() {
    if (!document.body.dataset.ready) performance.mark("gallery-cards");
    document.body.dataset.ready = "1";
  }

  // ---- sessions ------------------------------------------------------------------------------------------

  async function loadSessions() {
    const data = await getJSON("api/sessions");
    $("#total").textContent = `${data.total} images`;
    $("#store").textContent = data.store;
    $("#store").title = "the image store shown";
    const all = el("a", { href: "#", class: "all", text: "All images" }, el("span", { class: "n", text: String(data.total) }));
    if (state.session === null) all.setAttribute("aria-current", "page");
    const picks = el("a", { href: "#picks", class: "picks", text: "★ Picks" });
    if (state.standing === "pick") {
      all.removeAttribute("aria-current");
      picks.setAttribute("aria-current", "page");
    }
    const items = [el("li", {}, all), el("li", {}, picks)];
    for (const s of data.sessions) {
      const label = [el("span", { class: "name", text: sessionName(s.session) }), el("span", { class: "n", text: String(s.count) }), el("time", { text: when(s.last_at) })];
      if (s.session === null) {
        items.push(el("li", { class: "unnamed", title: "images stored without a session, shown under All images" }, ...label));
      } else {
        const link = el("a", { href: `#session=${encodeURIComponent(s.session)}`, "data-session": s.session }, ...label);
        if (state.session === s.session) link.setAttribute("aria-current", "page");
        items.push(el("li", {}, link));
      }
    }
    $("#session-list").replaceChildren(...items);
  }

  // ---- one image in full ---------------------------------------------------------------------------------

  async function cardFor(id) {
    return state.cards.get(id) || getJSON(`api/images/${encodeURIComponent(id)}`);
  }

  function copyButton(label, text) {
    const button = el("button", { type: "button", class: "copy", text: label });
    button.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(text);
      } catch {
        const area = el("textarea", { class: "offscreen" });
        area.value = text;
        document.body.append(area);
        area.select();
        document.execCommand("copy");
        area.remove();
      }
      button.textContent = "Copied";
      setTimeout(() => (button.textContent = label), 1500);
    });
    return button;
  }

  async function openDetail(id) {
    let card;
    try {
      card = await cardFor(id);
    } catch {
      alert(`${id} is no longer in the store (evicted).`);
      return;
    }
    const rows = [
      ["Tool", toolLabel(card.tool)],
      ["Session", sessionName(card.session)],
      ["Seed", card.seed],
      ["Size", `${card.width}×${card.height} px, ${(card.size_bytes / 1024).toFixed(0)} KiB PNG`],
      ["Model", card.model && `${card.model}${card.variant ? ` (${card.variant})` : ""}`],
      ["Steps", card.steps],
      ["Guidance", card.guidance],
      ["Made", when(card.created_at)],
      ["Model time", card.elapsed_ms !== null ? ms(card.elapsed_ms) : null],
      ["Imported from", card.source],
    ].filter(([, value]) => value !== null && value !== undefined && value !== "");
    const from = el("div", { class: "from" });
    const into = el("div", { class: "made-into" });
    fillChips(from, "from", card.parents);
    fillChips(into, "made into", state.children.get(card.id) || []);
    const again = [];
    if (card.cli) {
      again.push(el("h3", { text: "Make it again" }));
      again.push(el("div", { class: "copyable" }, el("pre", { class: "cli", text: card.cli }), copyButton("Copy CLI command", card.cli)));
      const mcp = JSON.stringify(card.mcp, null, 2);
      again.push(el("div", { class: "copyable" }, el("pre", { class: "mcp", text: mcp }), copyButton("Copy MCP call", mcp)));
      if (card.parents.length) again.push(el("p", { class: "hint", text: "The CLI reads its references as files: download each parent's PNG first (it is saved as <id>.png)." }));
    } else {
      again.push(el("p", { class: "hint", text: "An imported reference: it was given to the agent, not made by the model." }));
    }
    const dialog = $("#detail");
    dialog.replaceChildren(
      el(
        "div",
        { class: "detail-body", "data-image-id": card.id },
        el("figure", { class: "full" }, el("img", { src: fileUrl("image", card.id, ".png"), alt: card.prompt || card.source || card.id, width: card.width, height: card.height })),
        el(
          "section",
          { class: "info" },
          el("div", { class: "head" }, el("span", { class: "tool", text: toolLabel(card.tool) }), el("code", { class: "id", text: card.id })),
          card.prompt ? el("p", { class: "prompt-full", text: card.prompt }) : null,
          el("table", { class: "recipe" }, ...rows.map(([key, value]) => el("tr", {}, el("th", { text: key }), el("td", { text: String(value) })))),
          el("div", { class: "lineage" }, from, into),
          ...again,
          el("p", { class: "actions" }, el("a", { class: "button", href: fileUrl("image", card.id, ".png?download=1"), download: `${card.id}.png`, text: "Download PNG" }), el("button", { type: "button", class: "close", text: "Close" })),
          el("details", {}, el("summary", { text: "Full recipe" }), el("pre", { class: "recipe-json", text: JSON.stringify(card.recipe, null, 2) })),
        ),
      ),
    );
    if (!dialog.open) dialog.showModal();
  }

  // ---- compare two ---------------------------------------------------------------------------------------

  function pick(id, on) {
    state.picked = state.picked.filter((other) => other !== id);
    if (on) state.picked.push(id);
    while (state.picked.length > 2) state.picked.shift();
    for (const box of document.querySelectorAll("input[data-pick]")) box.checked = state.picked.includes(box.dataset.pick);
    $("#compare-bar").hidden = state.picked.length === 0;
    $("#picked").replaceChildren(...state.picked.map(chip));
    $("#compare-open").disabled = state.picked.length !== 2;
  }

  async function openCompare(a, b) {
    const [left, right] = await Promise.all([cardFor(a), cardFor(b)]);
    const figure = (card, side) =>
      el(
        "figure",
        { class: `side-${side}`, "data-image-id": card.id },
        el("img", { src: fileUrl("image", card.id, ".png"), alt: card.prompt || card.id, width: card.width, height: card.height }),
        el("figcaption", { title: `${card.id} ${card.prompt || card.source || ""}` }, el("b", { text: side.toUpperCase() + " " }), el("code", { text: shortId(card.id) }), ` ${card.prompt || card.source || ""}`),
      );
    const stage = el("div", { class: "stage mode-side" }, figure(left, "a"), figure(right, "b"));
    stage.style.setProperty("--ratio", `${left.width} / ${left.height}`);
    const slider = el("input", { type: "range", min: 0, max: 100, value: 50, class: "slider", "aria-label": "Split between A and B", hidden: true });
    slider.addEventListener("input", () => stage.style.setProperty("--split", `${slider.value}%`));
    stage.style.setProperty("--split", "50%");
    const modes = [
      ["side", "Side by side"],
      ["slider", "Slider"],
      ["blink", "Blink"],
    ].map(([mode, label]) => el("button", { type: "button", "data-mode": mode, "aria-pressed": mode === "side" ? "true" : "false", text: label }));
    const setMode = (mode) => {
      stage.className = `stage mode-${mode}`;
      slider.hidden = mode !== "slider";
      for (const button of modes) button.setAttribute("aria-pressed", String(button.dataset.mode === mode));
      clearInterval(state.blink);
      state.blink = mode === "blink" ? setInterval(() => stage.classList.toggle("show-b"), 600) : null;
    };
    for (const button of modes) button.addEventListener("click", () => setMode(button.dataset.mode));
    const dialog = $("#compare");
    dialog.replaceChildren(
      el("div", { class: "compare-head" }, el("span", { class: "modes" }, ...modes), el("button", { type: "button", class: "close", text: "Close" })),
      stage,
      el("p", { class: "compare-hint", text: "Slider: A left of the line, B right of it. Blink: A and B in turn." }),
      slider,
    );
    if (!dialog.open) dialog.showModal();
  }

  // ---- live ----------------------------------------------------------------------------------------------

  // verdicts recorded after the cards loaded: static/verdicts.js
  const { lowerMark, syncVerdicts } = window.kleinVerdicts({ state, $, byId, getJSON, remember, renderCard, groupOf, verdicts });

  async function refresh(change) {
    state.headMark = change.verdicts;
    syncVerdicts().catch(() => {});
    loadSessions().catch(() => {});
    if (state.newest === undefined) return; // the view is still loading, and will show it
    if (state.session !== null) {
      const params = new URLSearchParams({ session: state.session, limit: "1" });
      const page = await getJSON(`api/images?${params}`);
      const newest = page.images.length ? page.images[0].id : null;
      if (newest !== state.newest) await showSession(state.session);
      return;
    }
    if (change.newest === state.newest || state.standing) return; // a new image is no one's pick yet
    const page = await getJSON(`api/images?limit=${PAGE}`);
    const fresh = [];
    for (const card of page.images) {
      if (state.cards.has(card.id)) break;
      fresh.push(card);
    }
    if (fresh.length === page.images.length && state.cards.size) $("#fresh").hidden = false;
    prepend(fresh);
    lowerMark(page.verdict_mark);
    state.newest = page.images.length ? page.images[0].id : null;
    $("#empty").hidden = state.cards.size > 0;
  }

  // A browser keeps only ~6 connections per server over HTTP/1.1 and each open stream holds one, so a tab that is
  // not visible closes its stream; on its return the first event (the store as it is now) brings it up to date.
  let source = null;
  function listen() {
    const live = $("#live");
    if (document.hidden) {
      if (source) source.close();
      source = null;
      live.textContent = "paused";
      live.classList.remove("on");
      return;
    }
    if (source) return;
    source = new EventSource("events");
    source.addEventListener("open", () => {
      live.textContent = "live";
      live.classList.add("on");
    });
    source.addEventListener("error", () => {
      live.textContent = "reconnecting…";
      live.classList.remove("on");
    });
    source.addEventListener("change", (event) => {
      refresh(JSON.parse(event.data)).catch(() => {});
    });
  }

  // ---- wiring --------------------------------------------------------------------------------------------

  function route() {
    let hash;
    try {
      hash = decodeURIComponent(location.hash.slice(1));
    } catch {
      hash = ""; // a hand-typed hash with a broken %-escape: show all images
    }
    if (hash.startsWith("image=")) {
      openDetail(hash.slice(6));
      if (state.newest !== undefined) return;
    }
    const session = hash.startsWith("session=") ? hash.slice(8) : null;
    const standing = hash === "picks" ? "pick" : null;
    if (session === state.session && standing === state.standing && state.newest !== undefined) return;
    state.session = session;
    state.standing = standing;
    document.body.dataset.ready = "";
    (session === null ? showAll() : showSession(session)).catch((error) => {
      $("#view-head").replaceChildren(el("p", { class: "error", text: `Could not load the images: ${error.message}` }));
    });
    loadSessions().catch(() => {});
  }

  document.addEventListener("click", (event) => {
    const target = event.target.closest("[data-open], [data-ref], .close");
    if (!target) return;
    if (target.matches(".close")) {
      target.closest("dialog").close();
      return;
    }
    event.preventDefault();
    openDetail(target.dataset.open || target.dataset.ref);
  });
  document.addEventListener("change", (event) => {
    if (event.target.matches("input[data-pick]")) pick(event.target.dataset.pick, event.target.checked);
  });
  for (const dialog of document.querySelectorAll("dialog")) {
    dialog.addEventListener("click", (event) => {
      if (event.target === dialog) dialog.close(); // a click on the backdrop
    });
  }
  $("#compare").addEventListener("close", () => clearInterval(state.blink));
  $("#compare-open").addEventListener("click", () => openCompare(state.picked[0], state.picked[1]));
  $("#compare-clear").addEventListener("click", () => {
    for (const id of [...state.picked]) pick(id, false);
  });
  $("#load-more").addEventListener("click", () => loadMore());
  new IntersectionObserver((entries) => {
    if (entries.some((entry) => entry.isIntersecting) && state.session === null) loadMore();
  }, { rootMargin: "800px" }).observe($("#load-more"));
  window.addEventListener("hashchange", route);
  document.addEventListener("visibilitychange", listen);
  window.addEventListener("pagehide", () => source && source.close());
  route();
  listen();
})();
