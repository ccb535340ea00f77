-- The items of Other Patient IDs Sequence (0010,1002) of each patient's instances, so that a
-- patient is found by a national id (BSN) or an ID at another institution with an index
-- lookup instead of a scan of every instance's metadata. Filled by ingest from now on, and
-- here from the metadata already stored. Kept in step with ../postgres/0009_patient_other_ids.sql.
CREATE TABLE patient_other_ids (
    other_id      TEXT NOT NULL,              -- (0010,0020) of the item
    issuer        TEXT NOT NULL DEFAULT '',   -- (0010,0021) of the item
    universal_id  TEXT NOT NULL DEFAULT '',   -- (0010,0024) > (0040,0032) of the item
    patient_fk    INTEGER NOT NULL REFERENCES patients(id),
    PRIMARY KEY (other_id, issuer, universal_id, patient_fk)
);

INSERT OR IGNORE INTO patient_other_ids (other_id, issuer, universal_id, patient_fk)
SELECT other_id, issuer, universal_id, patient_fk FROM (
    SELECT TRIM(json_extract(item.value, '$."00100020".Value[0]')) AS other_id,
           COALESCE(TRIM(json_extract(item.value, '$."00100021".Value[0]')), '') AS issuer,
           COALESCE(TRIM(json_extract(item.value,
               '$."00100024".Value[0]."00400032".Value[0]')), '') AS universal_id,
           st.patient_fk AS patient_fk
    FROM instance_metadata m
    JOIN instances i ON i.id = m.instance_fk
    JOIN series se ON se.id = i.series_fk
    JOIN studies st ON st.id = se.study_fk,
    json_each(CASE WHEN json_valid(m.json) THEN m.json ELSE '{}' END,
              '$."00101002".Value') AS item
    WHERE m.json LIKE '%"00101002"%'
)
WHERE other_id IS NOT NULL AND other_id <> '';
