"""The Hub README of a pushed dataset: the project's dataset card merged with what push_to_hub wrote.

`DatasetDict.push_to_hub` rewrites README.md on every push. It keeps the YAML keys it finds and sets
two of them for the pushed config: the `configs` entry (its data files, and `default` only on request)
and the `dataset_info` entry (features, split sizes). The merged card takes the prose and every other
key from dataset_card.md, and `configs` and `dataset_info` from the Hub, so it lists only configs and
splits that have files there. A re-push rewrites the merged card to the same text, as long as the data
is the same, because push_to_hub serialises cards with the same huggingface_hub `DatasetCard` code used
here and keeps the key order it finds.
"""

from __future__ import annotations

import yaml
from huggingface_hub import DatasetCard

# Placeholder for the repository id in the card's prose, e.g. in its `load_dataset("USER/NAME", ...)` example.
REPO_ID_PLACEHOLDER = "USER/NAME"

# The only per-config key carried over from the card. push_to_hub rewrites the entry of a pushed config
# as its data files plus `default` on request, so it would drop any other key again on every push.
CARRIED_CONFIG_KEYS = ("default",)


class CardError(ValueError):
    """A dataset card whose YAML header cannot be parsed or has the wrong shape."""


def parse_card(text: str, source: str) -> DatasetCard:
    """Parse a README with a YAML header, or raise CardError naming `source`."""
    try:
        card = DatasetCard(text)
    except (yaml.YAMLError, ValueError) as error:
        raise CardError(f"{source}: invalid YAML header ({error}); fix the block between the '---' lines") from error
    configs = card.data.get("configs") or []
    if not isinstance(configs, list) or not all(isinstance(entry, dict) and "config_name" in entry for entry in configs):
        raise CardError(f"{source}: 'configs' must be a list of mappings with a config_name, got {configs!r}")
    return card


def default_config(card: DatasetCard) -> str | None:
    """Return the name of the config marked `default: true` in a card, or None."""
    for entry in card.data.get("configs") or []:
        if entry.get("default"):
            return entry["config_name"]
    return None


def can_set_default(hub_card: DatasetCard | None) -> bool:
    """Tell whether push_to_hub(set_default=True) works on a repository with this README.

    datasets 3.6 looks up the current default before moving the flag. With configs listed but none
    marked default, that lookup picks the only config or none, then fails with a KeyError. The flag
    can move only when the README lists no configs or marks one as default.
    """
    if hub_card is None:
        return True
    configs = hub_card.data.get("configs") or []
    return not configs or default_config(hub_card) is not None


def merge_card(card: DatasetCard, hub_card: DatasetCard | None, repo_id: str) -> str:
    """Build the README text: the card's prose and keys, with `configs` and `dataset_info` from the Hub."""
    # A fresh parse, so the caller's card is left as it was.
    merged = DatasetCard(card.content)
    hub_data = hub_card.data if hub_card is not None else {}
    card_entries = {entry["config_name"]: entry for entry in card.data.get("configs") or []}
    hub_entries = list(hub_data.get("configs") or [])
    card_default = default_config(card)
    default_on_hub = any(entry["config_name"] == card_default for entry in hub_entries)

    configs = []
    for hub_entry in hub_entries:
        entry = dict(hub_entry)
        if default_on_hub:
            # The card names the default and that config has files, so no other config keeps the flag.
            entry.pop("default", None)
        card_entry = card_entries.get(entry["config_name"], {})
        entry.update({key: card_entry[key] for key in CARRIED_CONFIG_KEYS if key in card_entry})
        configs.append(entry)

    if configs:
        merged.data["configs"] = configs
    else:
        merged.data.pop("configs", None)
    if hub_data.get("dataset_info"):
        merged.data["dataset_info"] = hub_data["dataset_info"]
    merged.text = card.text.replace(REPO_ID_PLACEHOLDER, repo_id)
    return str(merged)
