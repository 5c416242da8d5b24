"""Vocabularies of the synthetic marketplace: per category, the product nouns, materials, brands and sizes
that titles and descriptions are composed of, with a reference price. The hidden ground truth scores items by
these same attributes, so the text carries the signal that an item encoder can learn."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CategoryVocab:
    name: str
    nouns: tuple[str, ...]
    materials: tuple[str, ...]
    brands: tuple[str, ...]
    sizes: tuple[str, ...]
    reference_price: float
    has_colour: bool
    uses: tuple[str, ...]
    material_phrase: str = "made of {}"


COLOURS: tuple[str, ...] = ("black", "white", "navy", "grey", "red", "green", "beige", "blue", "pink", "olive",
                            "brown", "yellow")

# (word in the title, quality tier added to the item's latent quality, price factor)
QUALIFIERS: tuple[tuple[str, float, float], ...] = (
    ("Essential", -0.4, 0.75),
    ("Everyday", -0.2, 0.85),
    ("Classic", 0.0, 1.0),
    ("Compact", 0.0, 0.95),
    ("Eco", 0.1, 1.1),
    ("Vintage", 0.1, 1.15),
    ("Premium", 0.4, 1.5),
    ("Deluxe", 0.5, 1.7),
    ("Pro", 0.5, 1.8),
)

CATEGORIES: tuple[CategoryVocab, ...] = (
    CategoryVocab("Clothing", ("t-shirt", "sweater", "hoodie", "jacket", "jeans", "dress", "skirt", "shirt",
                               "cardigan", "coat"),
                  ("cotton", "wool", "linen", "denim", "polyester", "cashmere", "fleece"),
                  ("Nordvik", "Alba & Co", "Urbanthread", "Maison Lune", "Trailfox"),
                  ("size XS", "size S", "size M", "size L", "size XL"), 45.0, True,
                  ("the office", "weekends", "travel", "layering in autumn")),
    CategoryVocab("Shoes", ("sneakers", "boots", "sandals", "loafers", "running shoes", "heels", "slippers"),
                  ("leather", "suede", "canvas", "mesh", "rubber"),
                  ("Stridewell", "Pave", "Kestrel Run", "Oakstep"),
                  ("EU 37", "EU 39", "EU 41", "EU 43", "EU 45"), 80.0, True,
                  ("city walks", "trail running", "formal evenings", "lazy Sundays")),
    CategoryVocab("Electronics", ("headphones", "bluetooth speaker", "smartwatch", "power bank", "usb charger",
                                 "mechanical keyboard", "wireless mouse", "webcam"),
                  ("aluminium", "matte plastic", "tempered glass", "silicone"),
                  ("Voltra", "Sonique", "Pixelon", "Arcwave"),
                  ("10000 mAh", "20 W", "1080p", "standard"), 60.0, True,
                  ("home offices", "commuting", "gaming", "video calls")),
    CategoryVocab("Home & Kitchen", ("frying pan", "saucepan", "kettle", "knife set", "coffee mug",
                                    "cutting board", "blender", "toaster"),
                  ("stainless steel", "cast iron", "ceramic", "bamboo", "borosilicate glass"),
                  ("Hearthly", "Copperline", "Kitchara", "Vessel & Oak"),
                  ("small", "medium", "large", "family size"), 35.0, True,
                  ("everyday cooking", "weekend baking", "small kitchens", "hosting dinners")),
    CategoryVocab("Beauty", ("face cream", "serum", "shampoo", "lipstick", "perfume", "body lotion", "sunscreen"),
                  ("aloe vera", "vitamin C", "hyaluronic acid", "argan oil", "shea butter"),
                  ("Lumiere", "Glowfield", "Pura Verde"),
                  ("30 ml", "50 ml", "100 ml", "250 ml"), 22.0, False,
                  ("dry skin", "daily routines", "sensitive skin", "summer days"), "enriched with {}"),
    CategoryVocab("Sports & Outdoors", ("yoga mat", "tent", "hiking backpack", "water bottle", "dumbbells",
                                       "cycling helmet", "sleeping bag"),
                  ("nylon", "neoprene", "steel", "recycled foam", "ripstop polyester"),
                  ("Summit Gear", "Fjellro", "Peakline"),
                  ("1 person", "2 kg", "25 litre", "one size"), 55.0, True,
                  ("camping trips", "home workouts", "mountain hikes", "commuting by bike")),
    CategoryVocab("Toys", ("building blocks", "jigsaw puzzle", "plush bear", "board game", "toy car",
                           "doll house", "kite"),
                  ("wood", "plastic", "felt", "cardboard"),
                  ("Tinkerly", "Bramblebox", "Jollyworks"),
                  ("ages 3+", "ages 6+", "ages 8+", "ages 12+"), 25.0, True,
                  ("rainy afternoons", "birthday gifts", "family game nights", "creative play")),
    CategoryVocab("Books", ("novel", "cookbook", "travel guide", "picture book", "biography", "notebook",
                            "comic album"),
                  ("hardcover", "paperback", "spiral-bound"),
                  ("Inkwell Press", "Foxglove Books", "Northlight Editions"),
                  ("pocket edition", "standard edition", "illustrated edition"), 18.0, False,
                  ("bedtime reading", "long journeys", "curious minds", "gift giving"), "bound as a {}"),
    CategoryVocab("Garden", ("plant pot", "garden hose", "pruning shears", "bird feeder", "seed kit",
                             "watering can"),
                  ("terracotta", "galvanised steel", "recycled plastic", "cedar wood"),
                  ("Greenthumb", "Verdancy", "Rootstock"),
                  ("small", "medium", "large"), 28.0, True,
                  ("balcony gardens", "allotments", "indoor plants", "spring planting")),
    CategoryVocab("Pet Supplies", ("dog bed", "cat tree", "dog leash", "pet bowl", "chew toy", "litter box"),
                  ("rope", "natural rubber", "plush", "stainless steel"),
                  ("Pawsome", "Tailwind Pets", "Furhaven"),
                  ("small", "medium", "large"), 30.0, True,
                  ("puppies", "senior cats", "active dogs", "indoor pets")),
    CategoryVocab("Jewelry", ("necklace", "ring", "earrings", "bracelet", "wristwatch"),
                  ("sterling silver", "gold-plated brass", "rose gold", "titanium", "freshwater pearl"),
                  ("Aurelia", "Stellar Gems", "Maren"),
                  ("one size", "adjustable", "size 7"), 70.0, False,
                  ("anniversaries", "everyday wear", "weddings", "gifts")),
    CategoryVocab("Grocery", ("coffee beans", "green tea", "dark chocolate", "olive oil", "pasta", "honey"),
                  ("organic", "fair-trade", "single-origin", "gluten-free"),
                  ("Harvest Lane", "Bellacampo", "Old Mill"),
                  ("250 g", "500 g", "1 kg"), 9.0, False,
                  ("breakfast", "the pantry", "gifting", "slow Sundays"), "{}, carefully sourced"),
)
