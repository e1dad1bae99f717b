"""Print the README's set-up command marked `<!-- ci: NAME ... -->` (the bash block right after it), so
CI runs the README itself and the two cannot drift apart."""
import re
import sys
from pathlib import Path

name = sys.argv[1]
text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
found = re.search(rf"<!-- ci: {re.escape(name)}\b[^>]*-->\s*```bash\n(.*?)\n```", text, re.S)
if not found:
    sys.exit(f"README.md has no `<!-- ci: {name} -->` marker before a ```bash block")
print(found.group(1).strip())
