"""The generative demo task: pull the customer's name, city and order number out of a
support message, as one line of JSON, scored field by field (`--metric json`).

    Message: Hi, this is Maria Lopez from Denver. My kettle arrived broken, order K2961.
    JSON: {"name": "Maria Lopez", "city": "Denver", "order": "K2961"}

The messages are written here from phrasings and name, city and product lists, with a
fixed seed, so every run sees the same files. The splits are built apart on purpose:

- train: inputs only, no answers (the teacher labels them: `shrink label`), from the
  TRAIN phrasings, and names and cities most of which are invented from syllables
  (hundreds of each), so that no list of names a student could memorise fits them;
- dev: with answers, where settings may be chosen: like test, from phrasings, names and
  cities that neither train nor test has, so that a dev score measures what test does
  (answers for messages unlike the training ones), not recall of training names;
- test: with answers, from other phrasings (longer, reordered, some with a second
  sentence of noise), other first and last names and other cities than train and dev.
  Nothing is tuned on it and it does not shape the student.

The answers are the generator's own (the truth), not the teacher's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SIZES = {"train": 1200, "dev": 100, "test": 150}
SEED = 20261201
TEMPLATE = "Message: {text}\nJSON:"
FIELDS = ("name", "city", "order")

# Training phrasings vary length, order and noise, so that what fits them all is copying
# the fields, not where they sit; the test phrasings are other sentences again.
TRAIN_PHRASINGS = (
    "Hi, this is {name} from {city}. My {item} arrived broken, order {order}.",
    "Order {order}: the {item} never showed up. Please help. - {name}, {city}",
    "Hello! {name} here ({city}). I want to return the {item} from order {order}.",
    "My name is {name} and I live in {city}. Where is my {item}? Order number {order}.",
    "{name} ({city}) writing about order {order}: the {item} is the wrong colour.",
    "Can someone call me back? {name}, {city}. It's about the {item}, order {order}.",
    "The {item} in order {order} is missing a part. I have waited two weeks already and nobody has replied "
    "to my emails. {name}, {city}",
    "{city} customer here, {name}. Order {order} - the {item} works but it is very loud. Is that normal?",
    "Please send the invoice for order {order} ({item}) to {name}, {city}. Thank you!",
    "I got someone else's {item}. My order was {order}. Thanks, {name} in {city}",
    "Refund request: order {order}, one {item}. Name: {name}. City: {city}.",
    "hi im {name} from {city}, the {item} from order {order} came late and scratched. not happy",
)
DEV_PHRASINGS = (
    "Hello, {name} in {city} again. The {item} (order {order}) has a dent on the side. Can I get a discount?",
    "order {order} / {item} / {name} / {city} - wrong size, please exchange",
    "To whom it may concern: my {item} never arrived. Order reference {order}. Sincerely, {name}, {city}.",
    "{name} from {city} - quick question about order {order}, when will the {item} ship?",
)
TEST_PHRASINGS = (
    "Good morning. I am writing because the {item} I bought (order {order}) stopped working after a week. "
    "I am {name}, based in {city}, and I would like a replacement.",
    "Third time asking!!! order {order}, {item}, still nothing. {name} / {city}",
    "Dear support team, please cancel order {order}. I no longer need the {item}. Regards, {name} of {city}.",
    "hey its {name}, im in {city} - got the {item} today but the box was empty?? order is {order}",
    "From {city}: {name} here. Order {order} was charged twice for one {item}. Please refund one.",
)
# Training and test names and cities are disjoint, and training has many of each, so that
# a student cannot answer from a list it memorised.
TRAIN_FIRST = tuple("""Maria John Aisha Wei Carlos Emma Liam Sofia Noah Priya Lucas Mei Omar Hannah Diego Chloe
Ivan Fatima Tom Yuki Anna Peter Laura David Sara Ahmed Julia Mark Elena Paul Nina Oscar Rosa Felix Clara Hugo Alice
Victor Irene Samuel Lena Daniel Marta Adam Eva Leo Amira Jonas Helen Pablo Rita Simon Olga Kenji Lucia Martin Alina
Bruno Greta Ali Teresa Erik Vera Nora Tariq Joanna Mario Ruth Stefan Lily Andre Paula Ravi Jana Boris Dina Milan
Iris Tobias Selma Kofi Agnes Luis Maya Ahmet Ines Jakob Tina Sven Asha Marco Dora Emil Yara Pedro Hana Nils Zara Rui
Kira Jamal Elsa Arman Lina Chen Ada Karl Ema Joel Ana Otto Mila""".split())
TRAIN_LAST = tuple("""Lopez Smith Khan Chen Garcia Brown Nguyen Rossi Patel Miller Silva Kim Haddad Novak Olsen Dubois
Johnson Wilson Taylor Clark Lewis Walker Young Allen King Wright Scott Green Baker Adams Nelson Hill Campbell Mitchell
Roberts Carter Phillips Evans Turner Torres Parker Collins Edwards Stewart Morris Murphy Cook Rogers Morgan Peterson
Cooper Reed Bailey Bell Gomez Kelly Howard Ward Cox Diaz Richardson Wood Watson Brooks Bennett Gray James Reyes Cruz
Hughes Price Myers Long Foster Sanders Ross Morales Powell Sullivan Russell Ortiz Jenkins Perry Butler Barnes Fisher
Henderson Coleman Simmons Patterson Jordan Reynolds Hamilton Graham Wallace West Cole Hayes Bryant Gibson Ellis
Stevens Murray Ford Marshall Owens McDonald Harrison Ruiz Kennedy Wells Alvarez Woods Mendoza Castillo Olson Webb
Vargas Weber Meyer Wagner Becker Schulz Hoffmann Klein Wolf Braun Kruger Lange Berger Jansen Bakker Visser Smit""".split())
TRAIN_CITIES = tuple("""Denver Leeds Lyon Austin Porto Osaka Dublin Quebec Perth Boise Tucson Malmo Bergen Kyoto Seville
Graz Boston Chicago Dallas Phoenix Seattle Portland Atlanta Miami Houston Detroit Memphis Omaha Tulsa Reno Madison Salem
Toledo Orlando Tampa Raleigh Richmond Buffalo Rochester Spokane Eugene Fargo Manchester Liverpool Bristol Cardiff
Glasgow Edinburgh Belfast Sheffield Nottingham Leicester Oxford Cambridge Brighton Paris Marseille Nice Toulouse Nantes
Bordeaux Lille Madrid Barcelona Valencia Bilbao Malaga Lisbon Braga Rome Milan Naples Turin Florence Venice Verona
Berlin Hamburg Munich Cologne Frankfurt Stuttgart Leipzig Dresden Vienna Salzburg Zurich Basel Bern Amsterdam
Rotterdam Utrecht Brussels Antwerp Ghent Copenhagen Aarhus Stockholm Uppsala Oslo Helsinki Warsaw Prague Brno Budapest
Athens Sofia Bucharest Toronto Ottawa Calgary Montreal Vancouver Winnipeg Sydney Melbourne Brisbane Auckland
Wellington Tokyo Nagoya Seoul Busan Manila Jakarta Mumbai Delhi Chennai Pune Cairo Tunis Accra Dakar""".split())
# Most training names and cities are invented from syllables, hundreds of each, so that
# no list of names fits the training answers and what does is copying them from the message.
SYLLABLES = tuple("""ka lo mi ren to sa vi dor el na bri tan os ul fe gar is po ny zel ar te mon qui ba li sto ve
ra dun ko me si har ju bel cor an ti wen ga fi rho sel mar ob tu ly dra ne kim""".split())


def invented(count: int, seed: str, parts: tuple[int, ...]) -> tuple[str, ...]:
    """`count` distinct capitalised words of `parts` syllables each (a fixed seed)."""
    rng, words = random.Random(seed), set()
    while len(words) < count:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice(parts))).capitalize())
    return tuple(sorted(words))


DEV_FIRST = ("Elif", "Gustav", "Pilar", "Ayodele", "Magnus", "Renata", "Kenta", "Oksana", "Thabo", "Marisol")
DEV_LAST = ("Sorensen", "Delgado", "Yilmaz", "Brennan", "Abara", "Lindgren", "Szabo", "Ferreira")
DEV_CITIES = ("Gdansk", "Leipheim", "Durban", "Tampere", "Cusco", "Nantucket", "Split", "Aarau")
TEST_FIRST = ("Grace", "Mateo", "Leila", "Arjun", "Zoe", "Kwame", "Ingrid", "Rafael", "Nadia", "Hiro", "Beatriz",
              "Tomasz", "Freya", "Idris", "Camille", "Anders", "Yasmin", "Dmitri", "Soren", "Lucinda")
TEST_LAST = ("Okafor", "Larsen", "Moreau", "Tanaka", "Fischer", "Romero", "Kowalski", "Mensah", "Lindqvist",
             "Herrera", "Nakamura", "Petrov", "Achebe", "Castellano", "Vasquez", "Holmberg")
TEST_CITIES = ("Nairobi", "Tallinn", "Adelaide", "Cork", "Halifax", "Bologna", "Lagos", "Krakow", "Geneva", "Fresno",
               "Riga", "Vilnius", "Hobart", "Kampala", "Lima", "Quito")
_HELD_OUT = set(DEV_FIRST + DEV_LAST + DEV_CITIES + TEST_FIRST + TEST_LAST + TEST_CITIES)
INVENTED_FIRST, INVENTED_LAST, INVENTED_CITIES = (
    tuple(w for w in invented(n, f"{SEED}-{kind}", parts) if w not in _HELD_OUT)
    for kind, n, parts in (("first", 400, (2, 3)), ("last", 500, (2, 3, 4)), ("city", 400, (2, 3))))
ITEMS = ("blender", "kettle", "lamp", "backpack", "phone case", "desk chair", "toaster", "headphones",
         "rice cooker", "yoga mat", "coffee grinder", "umbrella", "printer", "water bottle", "mattress", "drill")

# The teacher (a base model) reads three worked examples first (none from any split).
TEACHER_PREFIX = (
    'Message: Hi, I am Ana Costa from Lisbon and my order Q5512 is late.\n'
    'JSON: {"name": "Ana Costa", "city": "Lisbon", "order": "Q5512"}\n\n'
    'Message: Order T2087 came with a cracked mug. Ben Harris, Glasgow\n'
    'JSON: {"name": "Ben Harris", "city": "Glasgow", "order": "T2087"}\n\n'
    'Message: Please update my address. Order W7340. Thanks, Lina Berg (Oslo)\n'
    'JSON: {"name": "Lina Berg", "city": "Oslo", "order": "W7340"}\n\n'
)


def message(rng: random.Random, phrasings, first, last, cities) -> tuple[str, dict]:
    fields = {"name": f"{rng.choice(first)} {rng.choice(last)}", "city": rng.choice(cities),
              "order": f"{rng.choice('ABCDEFGHJKMNPRSUVXYZ')}{rng.randint(1000, 9999)}"}
    return rng.choice(phrasings).format(item=rng.choice(ITEMS), **fields), fields


def rows(split: str, count: int | None = None) -> list[dict]:
    """The split's task rows: train without completions, dev and test with the true JSON.
    `count` (default SIZES[split]): more rows extend the default ones, which come first."""
    rng = random.Random(f"{SEED}-{split}")
    pools = {"train": (TRAIN_PHRASINGS, TRAIN_FIRST + INVENTED_FIRST, TRAIN_LAST + INVENTED_LAST,
                       TRAIN_CITIES + INVENTED_CITIES),
             "dev": (DEV_PHRASINGS, DEV_FIRST, DEV_LAST, DEV_CITIES),
             "test": (TEST_PHRASINGS, TEST_FIRST, TEST_LAST, TEST_CITIES)}[split]
    out = []
    for _ in range(SIZES[split] if count is None else count):
        text, fields = message(rng, *pools)
        row = {"prompt": TEMPLATE.format(text=text)}
        if split != "train":
            row["completion"] = " " + json.dumps(fields)
        out.append(row)
    return out


def write_task_files(folder: Path, train_size: int | None = None) -> dict[str, Path]:
    """train.jsonl (inputs only; `train_size` rows, default SIZES["train"]), dev.jsonl,
    test.jsonl and teacher_prefix.txt in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SIZES:
        paths[split] = folder / f"{split}.jsonl"
        count = train_size if split == "train" else None
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows(split, count)), encoding="utf-8")
    paths["prefix"] = folder / "teacher_prefix.txt"
    paths["prefix"].write_text(TEACHER_PREFIX, encoding="utf-8")
    return paths
