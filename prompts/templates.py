"""The hand-written material behind the `chat`, `code` and `math` prompt sets."""

CHAT_TOPICS = [
    "photosynthesis", "black holes", "the water cycle", "vaccines", "inflation", "compound interest", "the Roman Empire",
    "the French Revolution", "climate change", "renewable energy", "electric cars", "the internet", "machine learning",
    "neural networks", "blockchain", "quantum computers", "DNA", "evolution", "plate tectonics", "volcanoes",
    "earthquakes", "the moon landing", "the solar system", "gravity", "magnetism", "electricity", "the human heart",
    "sleep", "meditation", "healthy eating", "running a marathon", "learning a new language", "public speaking",
    "time management", "job interviews", "writing a resume", "starting a small business", "saving money",
    "investing in index funds", "buying a first home", "gardening", "composting", "baking bread", "making coffee",
    "brewing tea", "cooking pasta", "growing tomatoes", "keeping houseplants alive", "adopting a dog", "training a cat",
    "bird migration", "honey bees", "coral reefs", "rainforests", "deserts", "glaciers", "the ocean tides",
    "the printing press", "the industrial revolution", "ancient Egypt", "the Great Wall of China", "the Renaissance",
    "impressionist painting", "classical music", "jazz", "the guitar", "the piano", "photography", "film editing",
    "video games", "chess", "football", "basketball", "the Olympic Games", "mountain climbing", "camping",
    "travelling on a budget", "jet lag", "airplanes", "trains", "bicycles", "traffic lights", "city planning",
    "recycling", "plastic pollution", "air quality", "antibiotics", "the immune system", "allergies", "the common cold",
    "first aid", "stress", "friendship", "teamwork", "leadership", "negotiation", "critical thinking", "democracy",
    "taxes", "supply and demand", "international trade", "cryptography", "passwords", "phishing emails",
    "cloud computing", "databases", "operating systems", "compilers", "open source software", "version control",
    "unit testing", "spreadsheets", "email etiquette", "remote work", "online privacy", "social media",
    "smartphones", "batteries", "solar panels", "wind turbines", "nuclear power", "rockets", "satellites", "GPS",
    "weather forecasts", "rainbows", "snowflakes", "the seasons", "calendars", "time zones", "maps", "libraries",
]

CHAT_TEMPLATES = [
    "What is {topic}?",
    "Can you explain {topic} to a ten-year-old?",
    "Give me three interesting facts about {topic}.",
    "What are the most common misconceptions about {topic}?",
    "Write a short paragraph about {topic}.",
    "What should a beginner know about {topic}?",
    "Why does {topic} matter in everyday life?",
    "Write a haiku about {topic}.",
    "List the pros and cons of {topic}.",
    "How would you describe {topic} in one sentence?",
]

CODE_MODULES = [
    "json", "os.path", "textwrap", "itertools", "functools", "collections", "re", "string", "math", "statistics",
    "shutil", "heapq", "bisect", "random", "difflib", "fnmatch", "glob", "base64", "urllib.parse", "html", "copy",
    "operator", "calendar", "secrets", "shlex", "zlib", "gzip", "tempfile", "uuid", "colorsys",
]

CODE_TASKS = [
    "Write a Python function that reverses a string.",
    "Write a Python function that checks whether a number is prime.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Write a Python function that counts the words in a text.",
    "Write a Python function that removes duplicates from a list while keeping the order.",
    "Write a Python function that merges two sorted lists.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python class for a stack with push, pop and peek.",
    "Write a Python function that flattens a nested list.",
    "Write a Python function that computes the factorial of a number recursively.",
    "Write a Python function that finds the largest element in a list without using max().",
    "Write a Python function that converts Celsius to Fahrenheit.",
    "Write a Python function that reads a CSV file and returns its rows as dictionaries.",
    "Write a Python function that implements binary search.",
    "Write a Python function that sorts a list of dictionaries by a key.",
    "Write a JavaScript function that debounces another function.",
    "Write a SQL query that returns the ten customers with the most orders.",
    "Write a bash command that counts the lines of all .py files in a directory.",
    "Explain the difference between a list and a tuple in Python.",
    "Explain what a Python decorator is, with an example.",
]

MATH_TEMPLATES = [
    "Tom has {a} apples. He buys {b} more and then gives {c} to his sister. How many apples does he have now?",
    "A shop sells pencils at {c} dollars each. Anna buys {a} pencils and pays with a {b}0 dollar note. "
    "How much change does she get?",
    "A train travels {a} kilometres per hour for {c} hours. How far does it go?",
    "There are {a} students in a class and {b} in another. They are split into groups of {c}. "
    "How many full groups are there?",
    "A rectangle is {a} metres long and {b} metres wide. What is its area and its perimeter?",
    "Maria saves {b} dollars every week. How much has she saved after {a} weeks?",
    "A baker makes {a} loaves in the morning and {b} in the afternoon. He sells {c} loaves every hour for 5 hours. "
    "How many loaves are left?",
    "A book has {a}0 pages. Sam reads {b} pages a day. How many days does he need to finish it?",
    "A farmer has {a} cows and {b} chickens. How many legs do the animals have in total?",
    "A recipe needs {c} eggs for {b} people. How many eggs are needed for {a} people?",
    "A car uses {c} litres of fuel per 100 kilometres. How much fuel does it need for {a}0 kilometres?",
    "Lisa is {a} years old. Her father is {c} times as old as she will be in {b} years. How old is her father?",
]
