"""Phone screenshots drawn with PIL, so the calibration set needs no binary files.

`draw_screen(kind, seed)` paints a status bar, a navigation bar and a body typical of the apps a
phone agent drives: a home screen of app icons, a chat, a settings list with toggles, a shop, a
login form, a map. Layout, colours and texts vary with the seed; the same (kind, seed) always
gives the same pixels. Dataset files refer to them as image parts "synthetic:<kind>:<seed>".
"""

from __future__ import annotations

import random
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

SIZE = (540, 1200)  # width, height: a 9:20 phone at half resolution
APPS = ["WeChat", "Alipay", "Taobao", "Meituan", "Maps", "Camera", "Photos", "Music", "Mail", "Clock",
        "Weather", "Notes", "Settings", "Calendar", "Douyin", "Bilibili", "Weibo", "JD", "Didi", "Phone"]
WORDS = ["ok", "see you at 7", "thanks!", "on my way", "meeting moved to 3pm", "lunch?", "sent the file",
         "happy birthday", "where are you", "call me later", "the order arrived", "price is 199"]
SETTINGS = ["Airplane mode", "Wi-Fi", "Bluetooth", "Mobile data", "Hotspot", "Notifications", "Sounds",
            "Display", "Dark mode", "Battery", "Storage", "Privacy", "Language", "About phone"]


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # NOTE: Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def _color(rng: random.Random, lo: int = 40, hi: int = 230) -> tuple[int, int, int]:
    return tuple(rng.randint(lo, hi) for _ in range(3))


def _status_bar(d: ImageDraw.ImageDraw, w: int, rng: random.Random, dark: bool) -> None:
    fg = (255, 255, 255) if dark else (20, 20, 20)
    d.text((24, 10), f"{rng.randint(7, 22)}:{rng.randint(0, 59):02d}", fill=fg, font=_font(20))
    for i in range(4):  # signal bars
        d.rectangle([w - 130 + i * 9, 28 - i * 5, w - 124 + i * 9, 30], fill=fg)
    d.rounded_rectangle([w - 70, 12, w - 28, 30], radius=4, outline=fg, width=2)
    d.rectangle([w - 67, 15, w - 67 + int(36 * rng.random()) + 3, 27], fill=fg)


def _nav_bar(d: ImageDraw.ImageDraw, w: int, h: int, dark: bool) -> None:
    d.rounded_rectangle([w // 2 - 70, h - 18, w // 2 + 70, h - 12], radius=3,
                        fill=(240, 240, 240) if dark else (30, 30, 30))


def _header(d: ImageDraw.ImageDraw, w: int, title: str, bg: tuple[int, int, int]) -> None:
    d.rectangle([0, 40, w, 110], fill=bg)
    d.text((24, 62), "<", fill=(30, 30, 30), font=_font(28))
    d.text((70, 62), title, fill=(20, 20, 20), font=_font(28))


def _home(d: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> None:
    for y in range(h):  # vertical gradient wallpaper
        t = y / h
        d.line([(0, y), (w, y)], fill=(int(30 + 60 * t), int(60 + 40 * t), int(120 + 80 * t)))
    apps = rng.sample(APPS, 20)
    for i, name in enumerate(apps[:16]):
        x, y = 30 + (i % 4) * 125, 130 + (i // 4) * 150
        d.rounded_rectangle([x, y, x + 90, y + 90], radius=22, fill=_color(rng))
        d.text((x + 45, y + 108), name, fill=(255, 255, 255), font=_font(17), anchor="mm")
    d.rounded_rectangle([20, h - 170, w - 20, h - 40], radius=36, fill=(255, 255, 255, 90))
    for i, name in enumerate(apps[16:]):
        x = 45 + i * 125
        d.rounded_rectangle([x, h - 150, x + 80, h - 70], radius=20, fill=_color(rng))


def _chat(d: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> None:
    d.rectangle([0, 0, w, h], fill=(237, 237, 237))
    _header(d, w, rng.choice(["Zhang San", "Mom", "Alex", "Family group", "Bob"]), (247, 247, 247))
    y = 140
    while y < h - 220:
        mine, text = rng.random() < 0.5, rng.choice(WORDS)
        tw = 24 + 11 * len(text)
        x0 = w - 90 - tw if mine else 90
        d.rounded_rectangle([mine and w - 70 or 20, y, (mine and w - 70 or 20) + 50, y + 50], radius=6,
                            fill=_color(rng))
        d.rounded_rectangle([x0, y, x0 + tw, y + 50], radius=10, fill=(149, 236, 105) if mine else (255, 255, 255))
        d.text((x0 + 12, y + 14), text, fill=(20, 20, 20), font=_font(20))
        y += 80 + rng.randint(0, 30)
    d.rectangle([0, h - 140, w, h], fill=(247, 247, 247))
    d.rounded_rectangle([70, h - 120, w - 130, h - 70], radius=8, fill=(255, 255, 255))
    d.rounded_rectangle([w - 115, h - 120, w - 20, h - 70], radius=8, fill=(7, 193, 96))
    d.text((w - 67, h - 95), "Send", fill=(255, 255, 255), font=_font(20), anchor="mm")


def _settings(d: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> None:
    d.rectangle([0, 0, w, h], fill=(242, 242, 247))
    _header(d, w, "Settings", (242, 242, 247))
    for i, name in enumerate(rng.sample(SETTINGS, 11)):
        y = 130 + i * 83
        d.rectangle([0, y, w, y + 82], fill=(255, 255, 255))
        d.rounded_rectangle([24, y + 21, 64, y + 61], radius=9, fill=_color(rng))
        d.text((84, y + 28), name, fill=(20, 20, 20), font=_font(22))
        if rng.random() < 0.5:
            on = rng.random() < 0.5
            d.rounded_rectangle([w - 100, y + 24, w - 30, y + 58], radius=17,
                                fill=(52, 199, 89) if on else (200, 200, 200))
            d.ellipse([w - 66 if on else w - 98, y + 26, w - 34 if on else w - 66, y + 56], fill=(255, 255, 255))
        else:
            d.text((w - 50, y + 26), ">", fill=(160, 160, 160), font=_font(26))
        d.line([(84, y + 81), (w, y + 81)], fill=(220, 220, 224))


def _shop(d: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> None:
    d.rectangle([0, 0, w, h], fill=(245, 245, 245))
    d.rounded_rectangle([20, 55, w - 20, 105], radius=25, outline=(255, 80, 0), width=3, fill=(255, 255, 255))
    d.text((50, 68), rng.choice(["bluetooth earbuds", "usb-c charger", "milk tea", "running shoes"]),
           fill=(150, 150, 150), font=_font(20))
    d.rounded_rectangle([20, 125, w - 20, 305], radius=14, fill=_color(rng, 150, 250))
    d.text((50, 200), "SALE  -50%", fill=(255, 255, 255), font=_font(36))
    for i in range(4):
        x, y = 20 + (i % 2) * 255, 325 + (i // 2) * 360
        d.rounded_rectangle([x, y, x + 245, y + 345], radius=12, fill=(255, 255, 255))
        d.rectangle([x + 10, y + 10, x + 235, y + 220], fill=_color(rng, 120, 240))
        d.text((x + 12, y + 232), f"Item {rng.randint(100, 999)}  4.{rng.randint(5, 9)} stars",
               fill=(40, 40, 40), font=_font(18))
        d.text((x + 12, y + 270), f"${rng.randint(9, 399)}", fill=(255, 60, 0), font=_font(28))
        d.rounded_rectangle([x + 150, y + 290, x + 235, y + 330], radius=20, fill=(255, 80, 0))
        d.text((x + 192, y + 310), "Buy", fill=(255, 255, 255), font=_font(18), anchor="mm")
    d.rectangle([0, h - 110, w, h - 30], fill=(255, 255, 255))
    for i, tab in enumerate(["Home", "Video", "Cart", "Me"]):
        d.text((67 + i * 135, h - 70), tab, fill=(80, 80, 80), font=_font(18), anchor="mm")


def _form(d: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> None:
    d.rectangle([0, 0, w, h], fill=(255, 255, 255))
    d.ellipse([w // 2 - 60, 130, w // 2 + 60, 250], fill=_color(rng))
    d.text((w // 2, 300), rng.choice(["Welcome back", "Sign in", "Create account"]), fill=(20, 20, 20),
           font=_font(34), anchor="mm")
    for i, hint in enumerate(["Phone number", "Password", "Verification code"]):
        y = 380 + i * 100
        d.rounded_rectangle([40, y, w - 40, y + 70], radius=10, outline=(200, 200, 200), width=2)
        d.text((60, y + 22), hint, fill=(160, 160, 160), font=_font(22))
    d.rounded_rectangle([40, 700, w - 40, 775], radius=38, fill=_color(rng, 20, 120))
    d.text((w // 2, 737), "Log in", fill=(255, 255, 255), font=_font(26), anchor="mm")
    d.text((w // 2, 820), "Forgot password?   Register", fill=(60, 120, 220), font=_font(20), anchor="mm")


def _map(d: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> None:
    d.rectangle([0, 0, w, h], fill=(236, 232, 222))
    for _ in range(14):  # blocks, then roads on top
        x, y = rng.randint(0, w), rng.randint(100, h - 300)
        d.rectangle([x, y, x + rng.randint(40, 160), y + rng.randint(40, 160)], fill=(214, 226, 205))
    for _ in range(9):
        d.line([(rng.randint(0, w), rng.randint(0, h)), (rng.randint(0, w), rng.randint(0, h))],
               fill=(255, 255, 255), width=rng.randint(8, 18))
    for _ in range(3):
        x, y = rng.randint(60, w - 60), rng.randint(200, h - 360)
        d.ellipse([x - 16, y - 16, x + 16, y + 16], fill=(230, 60, 50))
    d.rounded_rectangle([20, 55, w - 20, 110], radius=12, fill=(255, 255, 255))
    d.text((50, 70), "Search places", fill=(150, 150, 150), font=_font(22))
    d.rounded_rectangle([0, h - 280, w, h], radius=24, fill=(255, 255, 255))
    d.text((30, h - 250), f"{rng.randint(2, 40)} min  ({rng.randint(1, 15)}.{rng.randint(0, 9)} km)",
           fill=(20, 20, 20), font=_font(28))
    d.rounded_rectangle([30, h - 150, w - 30, h - 80], radius=35, fill=(26, 115, 232))
    d.text((w // 2, h - 115), "Start", fill=(255, 255, 255), font=_font(26), anchor="mm")


_BODIES = {"home": _home, "chat": _chat, "settings": _settings, "shop": _shop, "form": _form, "map": _map}
KINDS = tuple(_BODIES)


def draw_screen(kind: str, seed: int = 0, size: tuple[int, int] = SIZE) -> Image.Image:
    """A deterministic RGB phone screenshot of the given kind (one of KINDS)."""
    if kind not in _BODIES:
        raise ValueError(f"unknown screen kind {kind!r}; choose one of {', '.join(KINDS)}")
    rng = random.Random(f"{kind}:{seed}")
    w, h = SIZE
    image = Image.new("RGB", SIZE, (255, 255, 255))
    d = ImageDraw.Draw(image, "RGBA")
    _BODIES[kind](d, w, h, rng)
    _status_bar(d, w, rng, dark=kind == "home")
    _nav_bar(d, w, h, dark=kind == "home")
    return image if size == SIZE else image.resize(size, Image.BICUBIC)
