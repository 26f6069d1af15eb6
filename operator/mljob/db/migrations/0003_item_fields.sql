-- 0003_item_fields: each item's fields besides its id, as dispatch read them.
--
-- Same conventions as 0001: unqualified names (the search_path schema), applied once inside the
-- runner's transaction, never edited once applied.

-- What a task needs besides the job's spec: the item's free fields (NULL when the item is only
-- its id). Re-dispatch after a lost stream builds its tasks from these rows, not from the item
-- source, which may have been edited since (an item removed from a ConfigMap would never be
-- re-published and end as Lost). Written with the id by the first registration; a resumed
-- dispatch does not overwrite it. Rows from before this migration keep NULL: their items are
-- re-dispatched with their id alone. `json`, not `jsonb`: it keeps the text as dispatch wrote
-- it, and a `\u0000` in a field, which a task may carry, is refused by `jsonb` only.
ALTER TABLE mljob_items ADD COLUMN fields json;
