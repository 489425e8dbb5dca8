"""Data preparation: MIMIC-IV + MIMIC-CXR-JPG inputs (real or synthetic) -> training shards.

`data_prep.schema` holds the file layouts, `data_prep.synthetic` writes the synthetic demo database
(`ehrxdiff demo-data`), `data_prep.prepare` builds the (I_prev, S_event, I_trg) shards.
"""
