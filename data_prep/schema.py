"""Column layouts of the MIMIC-IV 2.2, MIMIC-CXR-JPG 2.0.0 and Chest ImaGenome 1.0.0 files (file order).

Single source of truth for the synthetic generator (``data_prep.synthetic``) and for the
preprocessor's schema checks. Keys of ``MIMIC_COLUMNS`` are ``'<module>/<table>'``; the file is
``<mimic-iv root>/<module>/<table>.csv.gz`` (or ``.csv``).
"""
from __future__ import annotations

import os

MIMIC_COLUMNS = {
  'hosp/patients': ['subject_id', 'gender', 'anchor_age', 'anchor_year', 'anchor_year_group', 'dod'],
  'hosp/admissions': [
      'subject_id', 'hadm_id', 'admittime', 'dischtime', 'deathtime', 'admission_type',
      'admit_provider_id', 'admission_location', 'discharge_location', 'insurance', 'language',
      'marital_status', 'race', 'edregtime', 'edouttime', 'hospital_expire_flag'],
  'hosp/d_labitems': ['itemid', 'label', 'fluid', 'category'],
  'hosp/labevents': [
      'labevent_id', 'subject_id', 'hadm_id', 'specimen_id', 'itemid', 'order_provider_id',
      'charttime', 'storetime', 'value', 'valuenum', 'valueuom', 'ref_range_lower',
      'ref_range_upper', 'flag', 'priority', 'comments'],
  'hosp/prescriptions': [
      'subject_id', 'hadm_id', 'pharmacy_id', 'poe_id', 'poe_seq', 'order_provider_id',
      'starttime', 'stoptime', 'drug_type', 'drug', 'formulary_drug_cd', 'gsn', 'ndc',
      'prod_strength', 'form_rx', 'dose_val_rx', 'dose_unit_rx', 'form_val_disp',
      'form_unit_disp', 'doses_per_24_hrs', 'route'],
  'hosp/microbiologyevents': [
      'microevent_id', 'subject_id', 'hadm_id', 'micro_specimen_id', 'order_provider_id',
      'chartdate', 'charttime', 'spec_itemid', 'spec_type_desc', 'test_seq', 'storedate',
      'storetime', 'test_itemid', 'test_name', 'org_itemid', 'org_name', 'isolate_num',
      'quantity', 'ab_itemid', 'ab_name', 'dilution_text', 'dilution_comparison',
      'dilution_value', 'interpretation', 'comments'],
  'icu/icustays': [
      'subject_id', 'hadm_id', 'stay_id', 'first_careunit', 'last_careunit', 'intime',
      'outtime', 'los'],
  'icu/d_items': [
      'itemid', 'label', 'abbreviation', 'linksto', 'category', 'unitname', 'param_type',
      'lownormalvalue', 'highnormalvalue'],
  'icu/chartevents': [
      'subject_id', 'hadm_id', 'stay_id', 'caregiver_id', 'charttime', 'storetime', 'itemid',
      'value', 'valuenum', 'valueuom', 'warning'],
  'icu/inputevents': [
      'subject_id', 'hadm_id', 'stay_id', 'caregiver_id', 'starttime', 'endtime', 'storetime',
      'itemid', 'amount', 'amountuom', 'rate', 'rateuom', 'orderid', 'linkorderid',
      'ordercategoryname', 'secondaryordercategoryname', 'ordercomponenttypedescription',
      'ordercategorydescription', 'patientweight', 'totalamount', 'totalamountuom',
      'isopenbag', 'continueinnextdept', 'statusdescription', 'originalamount',
      'originalrate'],
  'icu/outputevents': [
      'subject_id', 'hadm_id', 'stay_id', 'caregiver_id', 'charttime', 'storetime', 'itemid',
      'value', 'valueuom'],
  'icu/procedureevents': [
      'subject_id', 'hadm_id', 'stay_id', 'caregiver_id', 'starttime', 'endtime', 'storetime',
      'itemid', 'value', 'valueuom', 'location', 'locationcategory', 'orderid', 'linkorderid',
      'ordercategoryname', 'ordercategorydescription', 'patientweight', 'isopenbag',
      'continueinnextdept', 'statusdescription', 'ORIGINALAMOUNT', 'ORIGINALRATE'],
}

CHEXPERT_LABELS = [
  'Atelectasis', 'Cardiomegaly', 'Consolidation', 'Edema', 'Enlarged Cardiomediastinum',
  'Fracture', 'Lung Lesion', 'Lung Opacity', 'No Finding', 'Pleural Effusion',
  'Pleural Other', 'Pneumonia', 'Pneumothorax', 'Support Devices']

# Chest ImaGenome findings used by the project (snake_case column names; the records' label order).
IMAGENOME_LABELS = [
  'consolidation', 'enlarged_cardiac_silhouette', 'enlarged_hilum', 'lung_opacity',
  'mediastinal_widening', 'pleural_effusion', 'pneumonia', 'pneumothorax',
  'pulmonary_edema_hazy_opacity', 'vascular_congestion']
# The same attributes as the release spells them (its `label_name`) -> our column name.
IMAGENOME_ATTRIBUTES = {
  'consolidation': 'consolidation', 'enlarged cardiac silhouette': 'enlarged_cardiac_silhouette',
  'enlarged hilum': 'enlarged_hilum', 'lung opacity': 'lung_opacity',
  'mediastinal widening': 'mediastinal_widening', 'pleural effusion': 'pleural_effusion',
  'pneumonia': 'pneumonia', 'pneumothorax': 'pneumothorax',
  'pulmonary edema/hazy opacity': 'pulmonary_edema_hazy_opacity', 'vascular congestion': 'vascular_congestion'}

# Chest ImaGenome 1.0.0 (a PhysioNet release of its own): tab-separated files under the release root, one
# row per (report sentence, anatomical box, attribute). The columns the reader uses (data_prep/imagenome.py)
# and that the synthetic generator writes, in the generator's order; the real files carry more columns.
IMAGENOME_DIR = 'chest-imagenome'
IMAGENOME_SILVER = 'silver_dataset/scene_tabular/attribute_relations_tabular.txt'
IMAGENOME_GOLD = 'gold_dataset/gold_attributes_relations_500pts_500studies1st.txt'
IMAGENOME_SILVER_COLUMNS = ['study_id', 'image_id', 'row_id', 'bbox', 'relation', 'label_name', 'categoryID',
                            'sentence']
IMAGENOME_GOLD_COLUMNS = ['patient_id'] + IMAGENOME_SILVER_COLUMNS

CXR_COLUMNS = {
  'mimic-cxr-2.0.0-metadata': [
      'dicom_id', 'subject_id', 'study_id', 'PerformedProcedureStepDescription',
      'ViewPosition', 'Rows', 'Columns', 'StudyDate', 'StudyTime',
      'ProcedureCodeSequence_CodeMeaning', 'ViewCodeSequence_CodeMeaning',
      'PatientOrientationCodeSequence_CodeMeaning'],
  'mimic-cxr-2.0.0-chexpert': ['subject_id', 'study_id'] + CHEXPERT_LABELS,
  'mimic-cxr-2.0.0-negbio': ['subject_id', 'study_id'] + CHEXPERT_LABELS,
  'mimic-cxr-2.0.0-split': ['dicom_id', 'study_id', 'subject_id', 'split'],
}

# Relative file paths (without the .csv.gz / .csv suffix).
MIMIC_IV_DIR = 'mimic-iv'
MIMIC_CXR_DIR = 'mimic-cxr'


def mimic_path(root, table, suffix='.csv.gz'):
  """Path of a MIMIC-IV table, e.g. ``mimic_path(r, 'hosp/labevents')``."""
  return os.path.join(root, *table.split('/')) + suffix


def check_columns(name, columns, expected=None):
  """Raise ValueError unless ``columns`` equals the schema (same names, same order)."""
  if expected is None:
    expected = MIMIC_COLUMNS.get(name) or CXR_COLUMNS[name]
  got = list(columns)
  if got != list(expected):
    missing = [c for c in expected if c not in got]
    extra = [c for c in got if c not in expected]
    raise ValueError(f'{name}: columns differ from schema (missing={missing}, extra={extra}, '
                     f'order ok={not missing and not extra})')
