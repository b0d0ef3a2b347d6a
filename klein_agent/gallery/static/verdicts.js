// The gallery's live verdicts: a pick, reject or note recorded after the cards loaded (record_verdict from any MCP
// client, the App view, another front-end on a shared store) shows on the cards on screen without a reload.
// Loaded before app.js, which calls kleinVerdicts(page) once with the page's state and helpers and gets back
// lowerMark (a load of cards read the verdicts as of this mark) and syncVerdicts (the feed's mark moved).
// Strings from the JSON are only ever set as text, as in app.js (the cards are drawn by its `verdicts`).
"use strict";

window.kleinVerdicts = ({ state, $, byId, getJSON, remember, renderCard, groupOf, verdicts }) => {
  // The feed's `verdicts` is the store's newest verdict mark; when it passes ours, we ask for what was recorded
  // since, a page of at most 100 records at a time: the cost follows the verdicts recorded, never the number of
  // cards on screen. Each change is an image's verdicts as they are now, so applying one twice does no harm.

  function lowerMark(mark) {
    if (mark === undefined) return;
    state.verdictMark = state.verdictMark === undefined ? mark : Math.min(state.verdictMark, mark);
    if (state.headMark > state.verdictMark) syncVerdicts().catch(() => {});
  }

  async function syncVerdicts() {
    if (state.syncing) {
      state.syncAgain = true; // the running loop goes round once more
      return;
    }
    state.syncing = true;
    try {
      do {
        state.syncAgain = false;
        while (state.verdictMark !== undefined && state.headMark > state.verdictMark) {
          const view = state.view;
          const after = state.verdictMark;
          const data = await getJSON(`api/verdicts?after=${encodeURIComponent(after)}`);
          if (view !== state.view) break; // a new view loads its cards with their verdicts
          for (const change of data.changes) await applyVerdicts(change, view);
          if (state.verdictMark !== after) continue; // a load meanwhile lowered it: go again from there
          // no progress: the newest records went with their images (evicted), so nothing is left to fetch
          state.verdictMark = data.mark > after ? data.mark : state.headMark;
        }
      } while (state.syncAgain);
    } finally {
      state.syncing = false;
    }
  }

  async function applyVerdicts(change, view) {
    const fields = { verdict: change.verdict, verdict_reason: change.verdict_reason, verdict_at: change.verdict_at, notes: change.notes };
    const card = state.cards.get(change.id);
    if (card) {
      Object.assign(card, fields);
      for (const node of byId(change.id)) redrawVerdicts(node, card);
    }
    if (state.standing !== "pick") return;
    if (card && card.verdict !== "pick") unshowPick(change.id);
    else if (!card && change.verdict === "pick") await showPick(change.id, view);
  }

  // A card's badge (outline or dimmed), its standing line and its notes, redrawn in place.
  function redrawVerdicts(node, card) {
    node.classList.remove("verdict-pick", "verdict-reject");
    if (card.verdict) node.classList.add(`verdict-${card.verdict}`);
    const meta = node.querySelector(".meta");
    const old = meta.querySelector(":scope > .verdicts");
    const box = verdicts(card);
    if (old && box) old.replaceWith(box);
    else if (old) old.remove();
    else if (box) meta.prepend(box);
  }

  // #picks: an image no longer picked leaves the view; a new pick joins it in its place (newest first in its
  // session's group), unless it is older than the cards loaded so far, where "load more" will bring it.
  function unshowPick(id) {
    for (const node of byId(id)) {
      const group = node.closest(".group");
      node.remove();
      if (group && !group.querySelector(".card")) {
        group.remove();
        state.groups.delete(group.dataset.session);
      }
    }
    state.cards.delete(id);
    $("#empty").hidden = state.cards.size > 0;
  }

  async function showPick(id, view) {
    let card;
    try {
      card = await getJSON(`api/images/${encodeURIComponent(id)}`);
    } catch {
      return; // evicted since
    }
    if (view !== state.view || state.cards.has(id) || card.verdict !== "pick") return;
    const at = (node) => state.cards.get(node.dataset.imageId).created_at;
    const shown = [...document.querySelectorAll("#cards .card")];
    if (!state.done && shown.length && card.created_at < Math.min(...shown.map(at))) return;
    remember(card);
    const root = $("#cards");
    const group = groupOf(card.session);
    if (!group.isConnected) {
      const later = [...root.children].find((other) => at(other.querySelector(".card")) < card.created_at);
      root.insertBefore(group, later || null);
    }
    const grid = group.querySelector(".grid");
    grid.insertBefore(renderCard(card), [...grid.children].find((other) => at(other) < card.created_at) || null);
    $("#empty").hidden = true;
  }

  return { lowerMark, syncVerdicts };
};
