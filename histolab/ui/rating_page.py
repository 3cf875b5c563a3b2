"""The rater page's client side: the images at a chosen pixel-exact zoom, the keyboard legend and its keys.

Nothing here knows where an image came from: it gets PNG bytes and lays them out. The zoom is whole
multiples of the study's served size with nearest-neighbour rendering (CSS ``image-rendering:
pixelated``), so a 64 px patch shown at 6x is 384 px of sharp 6x6 blocks, never a blurry upscale. The
keys only click the page's own controls, so every answer still goes through the same events (and the
same server-side checks) as a mouse click.
"""

from __future__ import annotations

import html
import io

from PIL import Image

from histolab.ui.images import png_data_url

ZOOM_CHOICES = [("Auto", "auto"), ("1×", "1"), ("2×", "2"), ("3×", "3"), ("4×", "4"), ("6×", "6"), ("8×", "8")]
ITEM_FIT_PX = 384  # "Auto": the largest whole zoom that keeps one image within this width
SET_FIT_PX = 192  # ... and within this for each image of a set, and for the reference images

CSS = """
#review-images img, #review-references img { image-rendering: pixelated; }
.hl-images { display: flex; flex-wrap: wrap; gap: 6px; overflow: auto; }
.hl-scale.hl-active { outline: 2px solid var(--color-accent, #f97316); outline-offset: 2px; }
#review-keys kbd { border: 1px solid #bbb; border-radius: 3px; padding: 0 4px; font-size: 12px; }
"""

LEGEND = (
    '<div class="histolab-small" id="review-keys-text">Keys: '
    "<kbd>0</kbd>–<kbd>9</kbd> score the highlighted scale (<kbd>T</kbd> for 10) and move on · "
    "<kbd>↑</kbd>/<kbd>↓</kbd> another scale · <kbd>R</kbd> real · <kbd>S</kbd> synthetic (then "
    "<kbd>1</kbd>–<kbd>5</kbd>: how sure) · <kbd>Enter</kbd> submit (once every required answer is "
    "given) · <kbd>+</kbd>/<kbd>−</kbd> zoom · <kbd>I</kbd> instructions</div>"
)

# Runs once per page (gr.HTML's js_on_load). It acts only while the task box is shown and the focus is not
# in a text field, and only by clicking the page's own radios and buttons.
KEYS_JS = r"""
if (window.__histolabRatingKeys) return;
window.__histolabRatingKeys = true;
const q = (sel) => document.querySelector(sel);
const shown = (el) => !!el && el.offsetParent !== null;
const scales = () => Array.from(document.querySelectorAll('.hl-scale')).filter(shown);
const answered = (el) => !!el.querySelector('input[type=radio]:checked');
let active = null;
function mark(i) {
  const list = scales();
  active = Math.max(0, Math.min(i, list.length - 1));
  list.forEach((el, j) => el.classList.toggle('hl-active', j === active));
}
function current() {
  const list = scales();
  const focused = list.findIndex((el) => el.contains(document.activeElement));
  if (focused >= 0) return focused;
  if (active !== null && active < list.length) return active;
  const first = list.findIndex((el) => !answered(el));
  return first >= 0 ? first : 0;
}
function choose(el, value) {
  const input = Array.from(el.querySelectorAll('input[type=radio]')).find((x) => x.value === String(value));
  if (!input) return false;
  input.click();
  return true;
}
function typing(t) {
  if (!t || !t.tagName) return false;
  if (t.isContentEditable || t.tagName === 'TEXTAREA' || t.tagName === 'SELECT') return true;
  return t.tagName === 'INPUT' && !['radio', 'checkbox', 'button', 'submit'].includes(t.type);
}
function zoom(step) {
  const radios = Array.from(document.querySelectorAll('#review-zoom input[type=radio]'));
  const i = radios.findIndex((x) => x.checked);
  const next = radios[Math.max(0, Math.min(radios.length - 1, (i < 0 ? 0 : i) + step))];
  if (next) next.click();
}
document.addEventListener('click', (e) => {
  const list = scales();
  const i = list.findIndex((el) => el.contains(e.target));
  if (i >= 0) mark(i);
  if (e.target.closest && e.target.closest('#review-submit, #review-previous')) active = null;
}, true);
document.addEventListener('keydown', (e) => {
  if (!shown(q('#review-task')) || e.ctrlKey || e.metaKey || e.altKey || typing(e.target)) return;
  const k = e.key;
  const list = scales();
  if ((/^[0-9]$/.test(k) || k === 't' || k === 'T') && list.length) {
    const i = current();
    if (choose(list[i], /^[0-9]$/.test(k) ? k : '10')) { mark(i + 1); e.preventDefault(); }
  } else if ((k === 'ArrowDown' || k === 'ArrowUp') && list.length) {
    mark(current() + (k === 'ArrowDown' ? 1 : -1));
    e.preventDefault();
  } else if (k === 'r' || k === 'R' || k === 's' || k === 'S') {
    const judge = q('#review-judgement');
    if (shown(judge) && choose(judge, k.toLowerCase() === 'r' ? 'real' : 'synthetic')) {
      const conf = scales().findIndex((el) => el.id === 'review-confidence');
      if (conf >= 0) mark(conf);
      e.preventDefault();
    }
  } else if (k === 'Enter') {
    if (e.target && e.target.tagName === 'BUTTON') return;
    const send = q('#review-submit');
    if (send && !send.disabled) { active = null; send.click(); }
    else { const todo = q('#review-todo'); if (todo) todo.scrollIntoView({block: 'nearest'}); }
    e.preventDefault();
  } else if (k === '+' || k === '=' || k === '-' || k === '_') {
    zoom(k === '+' || k === '=' ? 1 : -1);
    e.preventDefault();
  } else if (k === 'i' || k === 'I') {
    const head = q('#review-instructions .label-wrap') || q('#review-instructions button');
    if (head) { head.click(); e.preventDefault(); }
  }
});
"""

# Sets the page's zoom (a CSS variable every review image's width is computed from): no server round trip.
ZOOM_JS = """(z) => {
  const s = document.documentElement.style;
  if (!z || z === 'auto') s.removeProperty('--hl-zoom'); else s.setProperty('--hl-zoom', String(z));
  return [];
}"""


def auto_zoom(native_px: int, fit_px: int) -> int:
    """The largest whole zoom that keeps a ``native_px`` image within ``fit_px`` (at least 1)."""
    return max(1, fit_px // max(1, native_px))


def zoomed_images_html(pngs: list[bytes], *, caption: str, fit_px: int) -> str:
    """``<img>`` tags with the PNGs inline, sized native x zoom (the page's chosen zoom, or ``auto_zoom``).

    The alt text and caption are neutral ("Image 2 of 10"), as in ``images.blinded_images_html``.
    """
    if not pngs:
        return ""
    tags = []
    for i, png in enumerate(pngs, 1):
        with Image.open(io.BytesIO(png)) as im:
            width = im.size[0]
        alt = html.escape(f"{caption} {i} of {len(pngs)}" if len(pngs) > 1 else caption)
        size = f"calc({width}px * var(--hl-zoom, {auto_zoom(width, fit_px)}))"
        tags.append(
            f'<figure style="margin:4px;display:inline-block"><img src="{png_data_url(png)}" alt="{alt}" '
            f'style="width:{size};height:auto;max-width:none;image-rendering:pixelated;border:1px solid #ccc"/>'
            f'<figcaption style="text-align:center;font-size:12px">{alt}</figcaption></figure>'
        )
    return '<div class="hl-images">' + "".join(tags) + "</div>"
