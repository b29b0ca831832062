"""`fxjax data check`'s warnings about valid records (dataset_warnings, coco_warning): what is right record by
record but suspicious over the dataset (an image under two labels or in two files, an id reused, rotated
images with boxes, ms-swift answers that break the format, boxes that read as COCO's)."""

from __future__ import annotations

from typing import Sequence


def dataset_warnings(records, hints: Sequence[str], limit: int = 5, threads: int = 8) -> list[str]:
    """What is valid record by record but suspicious over the dataset: keys that look misspelt, an image used
    by more than one record (with different labels: a contradiction), an image in more than one file (a
    train / test leak when the files are the two splits), an id given to two records of a file. An image is
    its file's content: a copy under another name is the same image. At most `limit` examples each."""
    from collections import defaultdict

    from concurrent.futures import ThreadPoolExecutor

    from fxjax.data.images import SWAPPED_AXES, content_keys, exif_orientation

    keys = content_keys((r.image for r in records), threads)
    by_image = defaultdict(list)
    for r in records:
        by_image[keys[r.image]].append(r)
    repeated = [(key, rs) for key, rs in by_image.items() if len(rs) > 1]
    files = {key: [r.source.rsplit(":", 1)[0] for r in rs] for key, rs in repeated}  # source: "file:line"
    out = list(hints)

    def examples(items) -> str:
        shown = []
        for _, rs in items[:limit]:
            paths = list(dict.fromkeys(r.image for r in rs))
            named = len(paths) > 1  # copies: which record names which file
            listed = records_to_list(rs, limit)
            where = ", ".join(f"{r.source} {r.label}" + (f" {r.image}" if named else "") for r in listed)
            more = len(rs) - len(listed)  # (an image in 10k records listed them all: 16k characters a line)
            shown.append(" = ".join(paths[:limit]) + (f" = {len(paths) - limit} more file(s)" if len(paths) > limit
                                                       else "")
                         + f" ({where}" + (f", and {more} more record(s)" if more else "") + ")")
        return "; ".join(shown) + (f"; and {len(items) - limit} more" if len(items) > limit else "")

    contradictory = [(i, rs) for i, rs in repeated if len({r.label for r in rs}) > 1]
    if contradictory:
        out.append(f"{len(contradictory)} image(s) labelled both real and generated: {examples(contradictory)}")
    same = [(i, rs) for i, rs in repeated if len({r.label for r in rs}) == 1
            and len(files[i]) > len(set(files[i]))]  # repeated within a file
    if same:
        boxed_apart = any(len({tuple(region.bbox for region in r.regions) for r in rs if r.regions}) > 1
                          for _, rs in same)  # (records that box one image differently: its boxes one by one?)
        out.append(f"{len(same)} image(s) in more than one record of a file (trained on more often"
                   + ("; where these are an image's boxes one record each, merge them into one record's 'regions': "
                      "each record's answer names only its own box, and teaches the others as absent"
                      if boxed_apart else "") + f"): {examples(same)}")
    shared = [(i, rs) for i, rs in repeated if len(set(files[i])) > 1]
    if shared:
        out.append(f"{len(shared)} image(s) in more than one file (a leak if the files are train and test "
                   f"splits): {examples(shared)}")
    by_id = defaultdict(list)  # (a record without an id has its image's path as id: the same image)
    for r in records:
        by_id[(r.source.rsplit(":", 1)[0], r.record_id)].append(r)
    reused = [(key, rs) for key, rs in by_id.items() if len({keys[r.image] for r in rs}) > 1]  # (copies: one image)
    if reused:
        shown = "; ".join(f"{key[1]!r} ({', '.join(r.source for r in rs)})" for key, rs in reused[:limit])
        out.append(f"{len(reused)} id(s) given to records of other images in the same file (eval's predictions.jsonl "
                   f"names records by id): {shown}"
                   + (f"; and {len(reused) - limit} more" if len(reused) > limit else ""))
    boxed = [r for r in records if r.regions]
    with ThreadPoolExecutor(threads) as pool:  # (headers only; a network file system answers each in a round trip)
        turned = [r for r, n in zip(boxed, pool.map(exif_orientation, [r.image for r in boxed])) if n in SWAPPED_AXES]
    if turned:
        shown = ", ".join(f"{r.source} ({r.width}x{r.height} displayed)" for r in turned[:limit])
        out.append(f"{len(turned)} image(s) with boxes are stored rotated (EXIF orientation 5-8: width and height "
                   f"swap when displayed), and their boxes are read in the displayed frame, as transformers' "
                   f"load_image turns them: check that the annotations were drawn on that frame (a box drawn on the "
                   f"stored one can still lie inside the image, misplaced): {shown}"
                   + (f"; and {len(turned) - limit} more" if len(turned) > limit else ""))
    small = [r for r in records if min(r.width, r.height) < 28]
    if small:
        shown = ", ".join(f"{r.source} ({r.width}x{r.height})" for r in small[:limit])
        out.append(f"{len(small)} image(s) under 28 pixels on a side (one image token is 28 x 28 pixels): each such "
                   f"side is enlarged (to 28, or to reach data.min_pixels), its detail made up by the resize: {shown}"
                   + (f"; and {len(small) - limit} more" if len(small) > limit else ""))
    broken = [(r.source, why) for r in records if (why := answer_problem(r))]
    if broken:
        shown = "; ".join(f"{source}: {why}" for source, why in broken[:limit])
        out.append(f"{len(broken)} ms-swift record(s) whose answer breaks the output format (docs/format.md; "
                   f"`fxjax docs format`): SFT teaches it as written, and eval's format rate counts such an answer "
                   f"wrong: {shown}"
                   + (f"; and {len(broken) - limit} more" if len(broken) > limit else ""))
    return out


def records_to_list(rs: Sequence, limit: int) -> list:
    """At most `limit` of an image's records, in file order, the first of each label among them (a
    contradiction stays visible however many records agree)."""
    first: dict[str, int] = {}
    for i, r in enumerate(rs):
        first.setdefault(r.label, i)
    keep = set(first.values())
    keep |= set([i for i in range(len(rs)) if i not in keep][:max(0, limit - len(keep))])
    return [rs[i] for i in sorted(keep)]


def coco_warning(skipped, records) -> list[str]:
    """Boxes refused as inverted that read as COCO's [x, y, w, h]: a file in that convention has others that
    pass as corners (whenever w > x and h > y), wrong all the same, and nothing refuses those."""
    coco = [e for e in skipped if e.kind == "box_inverted" and "COCO's [x, y, w, h]" in e.problem]
    files = {e.where.rsplit(":", 1)[0] for e in coco}
    passed = [r for r in records if r.regions and r.source.rsplit(":", 1)[0] in files]
    if not coco or not passed:
        return []
    return [f"{len(coco)} record(s) refused for an inverted box that reads as COCO's [x, y, w, h] (e.g. "
            f"{coco[0].where}): if {', '.join(sorted(files))} use that convention, the boxes of its "
            f"{len(passed)} valid record(s) with regions are wrong too (a COCO box passes as corners whenever "
            f"w > x and h > y; e.g. {passed[0].source}): convert every box to [x, y, x + w, y + h]"]


def answer_problem(record) -> str | None:
    """What is wrong with an ms-swift record's assistant text as an SFT target (its placeholders filled as
    training fills them): the authors' format check for its label fails, or it gives other than one verdict;
    None when nothing is (a native record's target is rendered in the format)."""
    from fxjax import rewards
    from fxjax.data.prompts import render_target
    from fxjax.rewards.output_format import REF_START, THINK_START, VERDICT_START

    if record.format != "swift":
        return None
    target = render_target(record, [r.bbox for r in record.regions])
    verdicts = target.count(VERDICT_START)
    if verdicts != 1:
        return f"{verdicts} verdicts" if verdicts else "no verdict"
    if not rewards.format_ok(target, record.label):
        if record.label == "generated" and THINK_START + REF_START not in target:
            return "its <think> is not followed at once by its first region, as the format check of a generated image asks"
        return f"its markers are not in the order the format check of a {record.label} image asks"
    return None
