"""Asset metadata the Dagster UI shows: Markdown tables and thumbnail previews."""

import base64
import io
from collections.abc import Callable, Sequence

import dagster as dg
import pandas as pd
from PIL import Image

from imagegen_pipeline.image_files import DECODE_ERRORS


def markdown_table(frame: pd.DataFrame, columns: Sequence[str], rows: int = 10) -> dg.MetadataValue:
    """The first ``rows`` rows of ``frame`` as a Markdown table."""
    head = frame.loc[:, [c for c in columns if c in frame.columns]].head(rows)
    text = head.to_markdown(index=False) if len(head) else "_no rows_"
    return dg.MetadataValue.md(text)


def thumbnails(
    paths: Sequence[str],
    read_bytes: Callable[[str], bytes],
    limit: int = 6,
    size: int = 128,
) -> dg.MetadataValue:
    """Up to ``limit`` images inlined as small JPEG data URIs, so the UI shows them.

    A file that cannot be read or decoded gets a line saying why instead of its thumbnail:
    metadata never fails a step."""
    cells = []
    for path in list(paths)[:limit]:
        name = str(path).rsplit("/", 1)[-1]
        try:
            with Image.open(io.BytesIO(read_bytes(path))) as image:
                image = image.convert("RGB")
                image.thumbnail((size, size))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=80)
        except DECODE_ERRORS as error:
            cells.append(f"_{name} unreadable ({type(error).__name__}: {error})_")
            continue
        encoded = base64.b64encode(buffer.getvalue()).decode()
        cells.append(f"![{name}](data:image/jpeg;base64,{encoded})")
    return dg.MetadataValue.md(" ".join(cells) if cells else "_no images_")
