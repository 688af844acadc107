"""The short sentences every embedding benchmark sends: fixed, varied, 5-12 words each.

The engine sweep and every HTTP setup draw from the same list, so a text/s figure means the
same work wherever it is measured.

    texts = take_cycled(128)        # 128 texts: the 64 sentences, twice
    bodies = request_bodies(texts, model="minilm")  # pre-encoded JSON, one per text
"""

from __future__ import annotations

import json
from collections.abc import Sequence

SENTENCES: tuple[str, ...] = (
    "The cat slept on the warm windowsill all afternoon.",
    "Please send me the quarterly report by Friday.",
    "Rain is expected to continue through the weekend.",
    "She learned to play the violin at age seven.",
    "Our flight was delayed by three hours.",
    "The new library opens to the public next month.",
    "He forgot his umbrella at the coffee shop.",
    "Fresh bread smells wonderful early in the morning.",
    "The committee approved the budget after a long debate.",
    "Turn left at the second traffic light.",
    "My phone battery dies too quickly these days.",
    "The museum has a fine collection of old maps.",
    "Children were playing football in the park.",
    "Can you recommend a good book about history?",
    "The server restarted after the security update.",
    "We planted tomatoes and basil in the garden.",
    "The river froze solid during the cold winter.",
    "Her presentation impressed everyone in the room.",
    "This recipe needs two cups of flour.",
    "The train to Berlin leaves at noon.",
    "Stock prices fell sharply on Tuesday morning.",
    "The dog barked at every passing car.",
    "I would like a table for four, please.",
    "Scientists discovered a new species of frog.",
    "The meeting has been moved to Thursday afternoon.",
    "He repaired the bicycle with a borrowed wrench.",
    "The sunset painted the sky orange and pink.",
    "Our team won the match in the final minute.",
    "The password must contain at least twelve characters.",
    "She drinks green tea instead of coffee.",
    "The old bridge was closed for repairs.",
    "Students must submit their essays online.",
    "A gentle breeze moved through the tall grass.",
    "The hotel offers free breakfast to every guest.",
    "They watched a documentary about deep sea creatures.",
    "The printer on the third floor is out of paper.",
    "Mountains covered in snow surrounded the quiet village.",
    "He speaks three languages fluently.",
    "The concert tickets sold out within minutes.",
    "Remember to water the plants while I am away.",
    "The software update fixed several annoying bugs.",
    "A small boat drifted slowly across the lake.",
    "The bakery on the corner closes at six.",
    "Vaccines have saved millions of lives worldwide.",
    "Please keep your voice down in the library.",
    "The detective found a clue under the carpet.",
    "Electric cars are becoming more affordable every year.",
    "We ordered pizza and watched an old movie.",
    "The package should arrive within two business days.",
    "Owls hunt mostly at night.",
    "The teacher explained the theorem with a simple drawing.",
    "Traffic was heavy on the highway this morning.",
    "He keeps his tools neatly organised in the garage.",
    "The festival attracts visitors from around the world.",
    "Our neighbours are renovating their kitchen.",
    "The chef added a pinch of salt to the soup.",
    "Wind turbines turned slowly on the distant hills.",
    "She finished the marathon in under four hours.",
    "The invoice lists each item and its price.",
    "Birds gathered on the wire before migrating south.",
    "The lecture covered the basics of probability.",
    "I lost my keys somewhere in the house.",
    "The lighthouse guided ships safely into the harbour.",
    "Please confirm your appointment by replying to this message.",
)
"""64 sentences of 5-12 words on everyday topics (weather, work, travel, food, science)."""


def take_cycled(count: int, sentences: Sequence[str] = SENTENCES) -> list[str]:
    """The first ``count`` texts of ``sentences`` repeated end to end.

    ``take_cycled(3) == list(SENTENCES[:3])``; ``take_cycled(66)`` is all 64 then the first 2.
    Raises ``ValueError`` if ``count < 1`` or ``sentences`` is empty.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not sentences:
        raise ValueError("sentences must not be empty")
    return [sentences[i % len(sentences)] for i in range(count)]


def request_bodies(texts: Sequence[str], model: str) -> list[bytes]:
    """One OpenAI-style embeddings request body per text: ``{"model": m, "input": text}``."""
    return [json.dumps({"model": model, "input": text}).encode() for text in texts]
