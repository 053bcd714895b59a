"""Markdown -> HTML that Qt's rich-text engine (QTextDocument) lays out well. Pure functions, no Qt.

Why not markdown's fenced_code + codehilite: we need (1) a "Copy" link per code block that knows the
block's exact text, (2) unterminated fences while a reply streams to render as code already, and
(3) tables/code as Qt-friendly tables (QTextDocument has no CSS box model). So fences are split off
here and highlighted with Pygments (styles inlined), prose goes through Python-Markdown (tables,
sane_lists), and TeX math becomes Unicode + <sup>/<sub> — legible without a math engine.

Raw HTML in model output is shown as text, never interpreted.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import markdown

COPY_SCHEME = "kestrel-copy"   # anchors "kestrel-copy:N" copy code block N of the message
MONO = "'JetBrains Mono','Cascadia Code','SF Mono',Menlo,Consolas,'DejaVu Sans Mono',monospace"
MATH_FONT = "'Cambria Math','STIX Two Math','Latin Modern Math','DejaVu Serif',serif"

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)")
_LIST_OR_INDENT = re.compile(r"^(\s+\S|[-*+]\s|\d+[.)]\s|\|)")


@dataclass(frozen=True)
class Block:
    kind: str        # "prose" | "code"
    text: str
    lang: str = ""


@dataclass(frozen=True)
class Rendered:
    html: str
    code_blocks: tuple[str, ...]   # plain text of each code block, in anchor order


def split_fences(text: str) -> list[Block]:
    """Split into prose and fenced code; an unclosed fence runs to the end (a reply still streaming)."""
    blocks: list[Block] = []
    prose: list[str] = []
    code: list[str] = []
    fence = ""
    lang = ""
    for line in text.split("\n"):
        if not fence:
            m = _FENCE.match(line)
            if m:
                if prose:
                    blocks.append(Block("prose", "\n".join(prose)))
                    prose = []
                fence, lang, code = m.group(1), m.group(2), []
            else:
                prose.append(line)
        elif line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            blocks.append(Block("code", "\n".join(code), lang))
            fence = ""
        else:
            code.append(line)
    if fence:
        blocks.append(Block("code", "\n".join(code), lang))
    elif prose:
        blocks.append(Block("prose", "\n".join(prose)))
    return blocks


def stable_split(text: str) -> int:
    """Index up to which `text` can be rendered once and never again while more text streams in.

    A boundary is the start of a line that follows a blank line outside code fences and $$ math,
    and that does not continue a list, an indented block or a table (those would render differently
    if split).
    """
    best = 0
    pos = 0
    fence = ""
    in_math = False
    lines = text.split("\n")
    for i, line in enumerate(lines):
        pos += len(line) + 1          # start of line i + 1
        stripped = line.strip()
        if fence:
            if stripped.startswith(fence) and not stripped.strip(fence[0]):
                fence = ""
            continue
        m = _FENCE.match(line)
        if m:
            fence = m.group(1)
            continue
        if line.count("$$") % 2:
            in_math = not in_math
        if in_math or stripped or i == 0 or i + 2 >= len(lines):
            continue   # (the line after the blank one must be complete to tell a list item apart)
        following = lines[i + 1]
        if following.strip() and not _LIST_OR_INDENT.match(following):
            best = pos
    return min(best, len(text))


# --- math ------------------------------------------------------------------------------------------

_TEX_SYMBOLS = {
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "varepsilon": "ε", "zeta": "ζ",
    "eta": "η", "theta": "θ", "vartheta": "ϑ", "iota": "ι", "kappa": "κ", "lambda": "λ", "mu": "μ", "nu": "ν",
    "xi": "ξ", "pi": "π", "rho": "ρ", "sigma": "σ", "tau": "τ", "upsilon": "υ", "phi": "φ", "varphi": "φ",
    "chi": "χ", "psi": "ψ", "omega": "ω", "Gamma": "Γ", "Delta": "Δ", "Theta": "Θ", "Lambda": "Λ", "Xi": "Ξ",
    "Pi": "Π", "Sigma": "Σ", "Phi": "Φ", "Psi": "Ψ", "Omega": "Ω",
    "sum": "∑", "prod": "∏", "int": "∫", "oint": "∮", "partial": "∂", "nabla": "∇", "infty": "∞",
    "cdot": "·", "times": "×", "div": "÷", "pm": "±", "mp": "∓", "le": "≤", "leq": "≤", "ge": "≥",
    "geq": "≥", "neq": "≠", "ne": "≠", "approx": "≈", "equiv": "≡", "sim": "∼", "propto": "∝",
    "to": "→", "rightarrow": "→", "leftarrow": "←", "Rightarrow": "⇒", "Leftarrow": "⇐",
    "leftrightarrow": "↔", "Leftrightarrow": "⇔", "mapsto": "↦", "in": "∈", "notin": "∉", "subset": "⊂",
    "subseteq": "⊆", "supset": "⊃", "cup": "∪", "cap": "∩", "emptyset": "∅", "forall": "∀", "exists": "∃",
    "neg": "¬", "land": "∧", "lor": "∨", "cdots": "⋯", "ldots": "…", "dots": "…", "circ": "∘",
    "degree": "°", "angle": "∠", "perp": "⊥", "parallel": "∥", "hbar": "ℏ", "ell": "ℓ", "Re": "ℜ",
    "Im": "ℑ", "sqrt": "√", "quad": "  ", "qquad": "    ", ",": " ", ";": " ", "!": "", " ": " ",
    "langle": "⟨", "rangle": "⟩", "lfloor": "⌊", "rfloor": "⌋", "lceil": "⌈", "rceil": "⌉",
    "sin": "sin", "cos": "cos", "tan": "tan", "log": "log", "ln": "ln", "exp": "exp", "lim": "lim",
    "max": "max", "min": "min", "det": "det",
}
_UPRIGHT = {"sin", "cos", "tan", "log", "ln", "exp", "lim", "max", "min", "det"}
_GROUP = r"\{((?:[^{}]|\{[^{}]*\})*)\}"


def tex_to_html(expr: str) -> str:
    """Approximate TeX as readable HTML: symbols to Unicode, fractions to a/b, scripts to sup/sub."""
    s = html.escape(expr.strip(), quote=False)
    s = re.sub(r"\\(left|right|big|Big|bigg|Bigg|displaystyle)\b", "", s)
    s = re.sub(r"\\(?:text|mathrm|mathbf|mathit|operatorname|mathbb|mathcal)\s*" + _GROUP, r"\1", s)
    for _ in range(3):  # nested fractions / roots
        s = re.sub(r"\\[dt]?frac\s*" + _GROUP + r"\s*" + _GROUP,
                   lambda m: f"{_paren(m.group(1))}/{_paren(m.group(2))}", s)
        s = re.sub(r"\\sqrt\s*" + _GROUP, lambda m: f"√{_paren(m.group(1))}", s)
    s = re.sub(r"\\([A-Za-z]+|[,;! ])",
               lambda m: _TEX_SYMBOLS.get(m.group(1), m.group(1)) + (" " if m.group(1) in _UPRIGHT else ""), s)
    s = re.sub(r"\^" + _GROUP, r"<sup>\1</sup>", s)
    s = re.sub(r"_" + _GROUP, r"<sub>\1</sub>", s)
    s = re.sub(r"\^(\S)", r"<sup>\1</sup>", s)
    s = re.sub(r"_(\S)", r"<sub>\1</sub>", s)
    return s.replace("{", "").replace("}", "")


def _paren(s: str) -> str:
    s = s.strip()
    return s if re.fullmatch(r"[\w.]+|\\[A-Za-z]+", s) else f"({s})"


_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
_MATH = re.compile(
    r"\$\$(?P<b1>.+?)\$\$|\\\[(?P<b2>.+?)\\\]|\\\((?P<i1>.+?)\\\)|(?<![\\$\w])\$(?P<i2>[^\s$](?:[^$\n]*?[^\s$])?)\$(?![\w$])",
    re.S)


def _protect_math(text: str) -> tuple[str, list[str]]:
    """Replace math with alphanumeric placeholders Markdown leaves alone; return (text, html pieces)."""
    spans: list[str] = []
    code: list[str] = []

    def keep_code(m: re.Match[str]) -> str:
        code.append(m.group(0))
        return f"KESTRELCODE{len(code) - 1}Z"

    def math(m: re.Match[str]) -> str:
        block = m.group("b1") or m.group("b2")
        body = tex_to_html(block if block is not None else (m.group("i1") or m.group("i2")))
        style = f"font-family:{MATH_FONT}; font-style:italic;"
        if block is not None:
            spans.append(f'<p align="center" style="{style} font-size:12pt;">{body}</p>')
            return f"\n\nKESTRELMATH{len(spans) - 1}Z\n\n"
        spans.append(f'<span style="{style}">{body}</span>')
        return f"KESTRELMATH{len(spans) - 1}Z"

    text = _CODE_SPAN.sub(keep_code, text)
    text = _MATH.sub(math, text)
    text = re.sub(r"KESTRELCODE(\d+)Z", lambda m: code[int(m.group(1))], text)
    return text, spans


# --- rendering -------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _markdown() -> markdown.Markdown:
    md = markdown.Markdown(extensions=["tables", "sane_lists"], output_format="html")
    md.preprocessors.deregister("html_block")   # raw HTML from a model is text, not markup
    md.inlinePatterns.deregister("html")
    return md


def _prose_html(text: str, c: Mapping[str, str]) -> str:
    text, math = _protect_math(text)
    md = _markdown()
    md.reset()
    out = md.convert(text)
    out = re.sub(r"<p>KESTRELMATH(\d+)Z</p>", lambda m: math[int(m.group(1))], out)
    out = re.sub(r"KESTRELMATH(\d+)Z", lambda m: math[int(m.group(1))], out)
    out = out.replace(
        "<table>", f'<table border="1" cellspacing="0" cellpadding="6" width="100%" '
                   f'style="border-collapse:collapse; border-color:{c["table_border"]}; margin:6px 0 10px 0;">')
    out = re.sub(r"<th(\s|>)", f'<th bgcolor="{c["table_header"]}"\\1', out)
    out = re.sub(r"<pre><code[^>]*>(.*?)</code></pre>",
                 lambda m: _code_table(html.unescape(m.group(1)), "", None, c), out, flags=re.S)
    return out


@lru_cache(maxsize=4)
def _formatter(style: str):  # noqa: ANN202 - pygments type
    from pygments.formatters import HtmlFormatter

    return HtmlFormatter(noclasses=True, nowrap=True, style=style)


@lru_cache(maxsize=64)
def _lexer(lang: str):  # noqa: ANN202 - pygments type
    from pygments.lexers import TextLexer, get_lexer_by_name
    from pygments.util import ClassNotFound

    try:
        return get_lexer_by_name(lang.lower(), stripnl=False, ensurenl=False) if lang else TextLexer()
    except ClassNotFound:
        return TextLexer()


def warm_up(styles: tuple[str, ...], languages: tuple[str, ...] = ("python", "bash", "javascript", "json")) -> None:
    """Import Pygments' lexers/styles ahead of time (from a background thread at startup), so the
    first code block of a streaming reply does not stall the GUI on module imports."""
    for style in styles:
        _formatter(style)
    for lang in languages:
        _lexer(lang)
    _markdown()


def highlight(code: str, lang: str, style: str) -> str:
    from pygments import highlight as pyg_highlight

    return pyg_highlight(code, _lexer(lang), _formatter(style))


def _code_table(code: str, lang: str, index: int | None, c: Mapping[str, str], style: str = "") -> str:
    body = highlight(code, lang, style) if style else html.escape(code)
    body = body.rstrip("\n").replace("\n", "<br/>")
    label = html.escape(lang or "code")
    copy = (f'<a href="{COPY_SCHEME}:{index}" style="color:{c["muted"]}; text-decoration:none;">Copy</a>'
            if index is not None else "")
    return (
        f'<table width="100%" border="1" cellspacing="0" cellpadding="0" bgcolor="{c["code_bg"]}" '
        f'style="border-collapse:collapse; border-color:{c["code_border"]}; border-style:solid; '
        f'margin-top:4px; margin-bottom:10px;">'
        f'<tr><td bgcolor="{c["code_header"]}" style="padding:4px 12px;">'
        f'<table width="100%" border="0" cellspacing="0" cellpadding="0"><tr>'
        f'<td><span style="color:{c["muted"]}; font-size:8.5pt;">{label}</span></td>'
        f'<td align="right" style="font-size:8.5pt;">{copy}</td></tr></table></td></tr>'
        f'<tr><td style="padding:10px 12px;">'
        f'<p style="font-family:{MONO}; font-size:9pt; white-space:pre-wrap; margin:0;">{body}</p>'
        f"</td></tr></table>")


def render_markdown(text: str, colors: Mapping[str, str], style: str, first_code: int = 0) -> Rendered:
    """Render one message (or a stable slice of it). Code anchors are numbered from `first_code`."""
    parts: list[str] = []
    codes: list[str] = []
    for block in split_fences(text):
        if block.kind == "code":
            parts.append(_code_table(block.text, block.lang, first_code + len(codes), colors, style))
            codes.append(block.text)
        elif block.text.strip():
            parts.append(_prose_html(block.text, colors))
    return Rendered("".join(parts), tuple(codes))


def document_css(colors: Mapping[str, str]) -> str:
    """Default style sheet for message documents (QTextDocument.setDefaultStyleSheet)."""
    c = colors
    return (
        f"p {{ margin-top:0px; margin-bottom:8px; line-height:145%; }}"
        f"li {{ margin-bottom:3px; line-height:140%; }}"
        f"ul, ol {{ margin-top:0px; margin-bottom:8px; }}"
        f"h1 {{ font-size:15pt; font-weight:600; margin-top:10px; margin-bottom:6px; }}"
        f"h2 {{ font-size:13pt; font-weight:600; margin-top:10px; margin-bottom:6px; }}"
        f"h3, h4, h5, h6 {{ font-size:11pt; font-weight:600; margin-top:8px; margin-bottom:4px; }}"
        f"code {{ font-family:{MONO}; font-size:9pt; background-color:{c['inline_code']}; }}"
        f"a {{ color:{c['link']}; text-decoration:none; }}"
        f"blockquote {{ color:{c['muted']}; margin-left:12px; }}"
        f"hr {{ color:{c['border']}; }}"
        f"th {{ font-weight:600; }}"
    )
