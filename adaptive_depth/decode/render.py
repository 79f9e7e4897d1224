"""Showing generated text with each token's exit depth: ANSI colours for a terminal, HTML
for notebooks. Shallow exits are blue, full depth is red."""
from __future__ import annotations

import html
from typing import Sequence

# Terminal 256-colour codes from cool (shallow) to warm (deep).
_ANSI_RAMP = (27, 33, 39, 45, 51, 49, 48, 82, 118, 154, 190, 226, 220, 214, 208, 202, 196)


def _fraction(depth: int, num_layers: int) -> float:
  return (depth - 1) / max(num_layers - 1, 1)


def token_pieces(tokenizer, tokens: Sequence[int]) -> list[str]:
  """The text of each token, decoded one at a time."""
  return [tokenizer.decode([t]) for t in tokens]


def to_ansi(pieces: Sequence[str], depths: Sequence[int], num_layers: int) -> str:
  """Each piece on a background coloured by its exit depth."""
  out = []
  for piece, depth in zip(pieces, depths):
    colour = _ANSI_RAMP[round(_fraction(depth, num_layers) * (len(_ANSI_RAMP) - 1))]
    out.append(f'\x1b[48;5;{colour}m\x1b[30m{piece}\x1b[0m')
  return ''.join(out)


def ansi_legend(num_layers: int) -> str:
  return 'exit depth: ' + ' '.join(to_ansi([f' {d} '], [d], num_layers)
                                   for d in range(1, num_layers + 1))


def to_html(pieces: Sequence[str], depths: Sequence[int], num_layers: int) -> str:
  """A <span> per token with a hue from blue (depth 1) to red (full depth) and the depth in
  its tooltip; newlines kept."""
  spans = []
  for piece, depth in zip(pieces, depths):
    hue = round(240 * (1 - _fraction(depth, num_layers)))
    text = html.escape(piece).replace('\n', '<br>')
    spans.append(f'<span title="exit depth {depth}" style="background:hsl({hue},80%,80%)">'
                 f'{text}</span>')
  return ('<div style="font-family:monospace;white-space:pre-wrap;line-height:1.6">'
          + ''.join(spans) + '</div>')
