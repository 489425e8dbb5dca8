"""Event tables of the synthetic database (`data_prep.synthetic`): dictionaries (lab items, ICU items,
drugs, microbiology specimens), how each observation follows the simulated clinical state, and the
builders of the rows of labevents, chartevents, inputevents, procedureevents, prescriptions and
microbiologyevents.

Item ids, labels and categories imitate MIMIC-IV 2.2. Each table mixes entries that the expert
event filters (`event_filters.json`) select with entries that they drop, so that the preprocessor's
filtering is exercised.
"""
from __future__ import annotations

import datetime as dt

T0 = dt.datetime(2100, 1, 1)  # times are seconds after this instant
HOUR = 3600
_DAYS = {}


def _day(d: int) -> str:
  if d not in _DAYS:
    _DAYS[d] = (T0 + dt.timedelta(days=d)).strftime('%Y-%m-%d')
  return _DAYS[d]


def fmt_time(sec) -> str:
  """'YYYY-MM-DD HH:MM:SS' of `sec` seconds after 2100-01-01 00:00:00."""
  d, r = divmod(int(sec), 86400)
  return '%s %02d:%02d:%02d' % (_day(d), r // 3600, r // 60 % 60, r % 60)


def fmt_date(sec) -> str:
  return _day(int(sec) // 86400) + ' 00:00:00'


# ------------------------------------------------------------------- hosp/d_labitems and values
# itemid: (label, fluid, category, uom, ref_lo, ref_hi, value(vit, rng) -> float | str)
LABS = {
    # Blood Gas (selected by category)
    50821: ('pO2', 'Blood', 'Blood Gas', 'mm Hg', 85, 105, lambda v, r: v.get('po2', 90)),
    50818: ('pCO2', 'Blood', 'Blood Gas', 'mm Hg', 35, 45, lambda v, r: 40 + 8 * v.get('inf', 0) + r.normal(0, 3)),
    50820: ('pH', 'Blood', 'Blood Gas', 'units', 7.35, 7.45, lambda v, r: 7.41 - 0.1 * v.get('inf', 0) + r.normal(0, 0.02)),
    50813: ('Lactate', 'Blood', 'Blood Gas', 'mmol/L', 0.5, 2, lambda v, r: 1.1 + 4 * v.get('inf', 0) ** 2 + abs(r.normal(0, 0.3))),
    50802: ('Base Excess', 'Blood', 'Blood Gas', 'mEq/L', None, None, lambda v, r: r.normal(0, 2) - 4 * v.get('inf', 0)),
    50817: ('Oxygen Saturation', 'Blood', 'Blood Gas', '%', None, None, lambda v, r: min(100, v.get('spo2', 97) + r.normal(0, 1))),
    52033: ('Specimen Type', 'Blood', 'Blood Gas', None, None, None, lambda v, r: 'ART.'),
    # CRP (selected by label)
    50889: ('C-Reactive Protein', 'Blood', 'Chemistry', 'mg/L', 0, 5, lambda v, r: v.get('crp', 3)),
    51652: ('High-Sensitivity CRP', 'Blood', 'Chemistry', 'mg/L', 0, 3, lambda v, r: max(0.1, v.get('crp', 2) / 3 + r.normal(0, 0.5))),
    # dropped categories
    50912: ('Creatinine', 'Blood', 'Chemistry', 'mg/dL', 0.5, 1.2, lambda v, r: 0.9 + 0.8 * v.get('inf', 0) + abs(r.normal(0, 0.2))),
    50971: ('Potassium', 'Blood', 'Chemistry', 'mEq/L', 3.3, 5.1, lambda v, r: r.normal(4.1, 0.4)),
    50983: ('Sodium', 'Blood', 'Chemistry', 'mEq/L', 133, 145, lambda v, r: r.normal(139, 3)),
    50902: ('Chloride', 'Blood', 'Chemistry', 'mEq/L', 96, 108, lambda v, r: r.normal(102, 3)),
    50882: ('Bicarbonate', 'Blood', 'Chemistry', 'mEq/L', 22, 32, lambda v, r: r.normal(25, 2.5)),
    51006: ('Urea Nitrogen', 'Blood', 'Chemistry', 'mg/dL', 6, 20, lambda v, r: abs(r.normal(18, 7))),
    50931: ('Glucose', 'Blood', 'Chemistry', 'mg/dL', 70, 100, lambda v, r: abs(r.normal(120, 30))),
    50963: ('NTproBNP', 'Blood', 'Chemistry', 'pg/mL', 0, 353, lambda v, r: v.get('bnp', 200)),
    51301: ('White Blood Cells', 'Blood', 'Hematology', 'K/uL', 4, 11, lambda v, r: v.get('wbc', 7)),
    51222: ('Hemoglobin', 'Blood', 'Hematology', 'g/dL', 13.7, 17.5, lambda v, r: r.normal(11.5, 1.5)),
    51221: ('Hematocrit', 'Blood', 'Hematology', '%', 40, 51, lambda v, r: r.normal(35, 4)),
    51265: ('Platelet Count', 'Blood', 'Hematology', 'K/uL', 150, 400, lambda v, r: abs(r.normal(230, 70))),
    51491: ('pH', 'Urine', 'Hematology', 'units', 5, 8, lambda v, r: r.normal(6, 0.6)),
    51498: ('Specific Gravity', 'Urine', 'Hematology', None, 1.001, 1.035, lambda v, r: r.normal(1.015, 0.005)),
}
DICT_ONLY_LABS = [(50868, 'Anion Gap', 'Blood', 'Chemistry'), (50800, 'SPECIMEN TYPE', 'Blood', 'Blood Gas'),
                  (51200, 'Eosinophils', 'Blood', 'Hematology'), (51127, 'RBC, Pleural', 'Pleural', 'Hematology')]
D_LABITEMS = sorted([(k, v[0], v[1], v[2]) for k, v in LABS.items()] + DICT_ONLY_LABS)
LAB_PANELS = {'bg': [52033, 50821, 50818, 50820, 50813, 50802, 50817], 'crp': [50889], 'hscrp': [51652],
              'chem': [50912, 50971, 50983, 50902, 50882, 51006, 50931], 'cbc': [51301, 51222, 51221, 51265],
              'bnp': [50963], 'urine': [51491, 51498]}


def lab_value(itemid, vit, rng):
  """(value, valuenum, valueuom, ref_range_lower, ref_range_upper, flag) of one lab result."""
  _, _, _, uom, lo, hi, fn = LABS[itemid]
  x = fn(vit, rng)
  if isinstance(x, str):
    return x, None, uom, lo, hi, ''
  x = round(float(x), 3 if uom in (None, 'units') else 1)
  flag = 'abnormal' if lo is not None and (x < lo or x > hi) else ''
  return f'{x:g}', x, uom, lo, hi, flag


# ------------------------------------------------------------------- icu/d_items
# (itemid, label, abbreviation, linksto, category, unitname, param_type, lownormal, highnormal)
D_ITEM_ROWS = [
    (220045, 'Heart Rate', 'HR', 'chartevents', 'Routine Vital Signs', 'bpm', 'Numeric', None, None),
    (220179, 'Non Invasive Blood Pressure systolic', 'NBPs', 'chartevents', 'Routine Vital Signs', 'mmHg', 'Numeric', None, None),
    (220180, 'Non Invasive Blood Pressure diastolic', 'NBPd', 'chartevents', 'Routine Vital Signs', 'mmHg', 'Numeric', None, None),
    (220181, 'Non Invasive Blood Pressure mean', 'NBPm', 'chartevents', 'Routine Vital Signs', 'mmHg', 'Numeric', None, None),
    (223761, 'Temperature Fahrenheit', 'Temperature F', 'chartevents', 'Routine Vital Signs', '°F', 'Numeric', None, None),
    (220210, 'Respiratory Rate', 'RR', 'chartevents', 'Respiratory', 'insp/min', 'Numeric', None, None),
    (220277, 'O2 saturation pulseoxymetry', 'SpO2', 'chartevents', 'Respiratory', '%', 'Numeric', None, None),
    (223835, 'Inspired O2 Fraction', 'FiO2', 'chartevents', 'Respiratory', None, 'Numeric', None, None),
    (223834, 'O2 Flow', 'O2 Flow', 'chartevents', 'Respiratory', 'L/min', 'Numeric', None, None),
    (226732, 'O2 Delivery Device(s)', 'O2 Delivery Device(s)', 'chartevents', 'Respiratory', None, 'Text', None, None),
    (220224, 'Arterial O2 pressure', 'PO2 (Arterial)', 'chartevents', 'Labs', 'mmHg', 'Numeric', 75, 100),
    (220074, 'Central Venous Pressure', 'CVP', 'chartevents', 'Hemodynamics', 'mmHg', 'Numeric', None, None),
    (223791, 'Pain Level', 'Pain Level', 'chartevents', 'Pain/Sedation', None, 'Text', None, None),
    (228096, 'Richmond-RAS Scale', 'Richmond-RAS Scale', 'chartevents', 'Pain/Sedation', None, 'Text', None, None),
    (224639, 'Daily Weight', 'Daily Weight', 'chartevents', 'General', 'kg', 'Numeric', None, None),
    (220739, 'GCS - Eye Opening', 'GCS - Eye Opening', 'chartevents', 'Neurological', None, 'Text', None, None),
    (223900, 'GCS - Verbal Response', 'GCS - Verbal Response', 'chartevents', 'Neurological', None, 'Text', None, None),
    (223901, 'GCS - Motor Response', 'GCS - Motor Response', 'chartevents', 'Neurological', None, 'Text', None, None),
    (224080, 'Head of Bed', 'Head of Bed', 'chartevents', 'Treatments', None, 'Text', None, None),
    (224054, 'Braden Sensory Perception', 'Braden Sensory Perception', 'chartevents', 'Skin - Assessment', None, 'Text', None, None),
    (226512, 'Admission Weight (Kg)', 'Admission Weight (Kg)', 'chartevents', 'General', 'kg', 'Numeric', None, None),
    (229270, 'Flow (ECMO)', 'Flow (ECMO)', 'chartevents', 'ECMO', 'L/min', 'Numeric', None, None),
    (225158, 'NaCl 0.9%', 'NaCl 0.9%', 'inputevents', 'Fluids/Intake', 'mL', 'Solution', None, None),
    (225828, 'LR', 'LR', 'inputevents', 'Fluids/Intake', 'mL', 'Solution', None, None),
    (220949, 'Dextrose 5%', 'Dextrose 5%', 'inputevents', 'Fluids/Intake', 'mL', 'Solution', None, None),
    (221794, 'Furosemide (Lasix)', 'Furosemide (Lasix)', 'inputevents', 'Medications', 'mg', 'Solution', None, None),
    (225798, 'Vancomycin', 'Vancomycin', 'inputevents', 'Antibiotics', 'dose', 'Solution', None, None),
    (225893, 'Piperacillin/Tazobactam (Zosyn)', 'Piperacillin/Tazobactam (Zosyn)', 'inputevents', 'Antibiotics', 'dose', 'Solution', None, None),
    (225851, 'Cefepime', 'Cefepime', 'inputevents', 'Antibiotics', 'dose', 'Solution', None, None),
    (222168, 'Propofol', 'Propofol', 'inputevents', 'Medications', 'mg', 'Solution', None, None),
    (221906, 'Norepinephrine', 'Norepinephrine', 'inputevents', 'Medications', 'mg', 'Solution', None, None),
    (225975, 'Heparin Sodium (Prophylaxis)', 'Heparin Sodium (Prophylaxis)', 'inputevents', 'Medications', 'units', 'Solution', None, None),
    (226559, 'Foley', 'Foley', 'outputevents', 'Output', 'mL', 'Numeric', None, None),
    (226560, 'Void', 'Void', 'outputevents', 'Output', 'mL', 'Numeric', None, None),
    (226588, 'Chest Tube #1', 'Chest Tube #1', 'outputevents', 'Output', 'mL', 'Numeric', None, None),
    (225459, 'Chest X-Ray', 'Chest X-Ray', 'procedureevents', 'Imaging', None, 'Process', None, None),
    (221214, 'CT scan', 'CT scan', 'procedureevents', 'Imaging', None, 'Process', None, None),
    (225792, 'Invasive Ventilation', 'Invasive Ventilation', 'procedureevents', 'Ventilation', None, 'Process', None, None),
    (224385, 'Intubation', 'Intubation', 'procedureevents', 'Intubation/Extubation', None, 'Process', None, None),
    (227194, 'Extubation', 'Extubation', 'procedureevents', 'Intubation/Extubation', None, 'Process', None, None),
    (225752, 'Arterial Line', 'Arterial Line', 'procedureevents', 'Access Lines - Invasive', None, 'Process', None, None),
    (224263, 'Multi Lumen', 'Multi Lumen', 'procedureevents', 'Access Lines - Invasive', None, 'Process', None, None),
    (225202, '20 Gauge', '20 Gauge', 'procedureevents', 'Access Lines - Peripheral', None, 'Process', None, None),
    (225433, 'Chest Tube Placed', 'Chest Tube Placed', 'procedureevents', 'Procedures', None, 'Process', None, None),
    (225437, 'Thoracentesis', 'Thoracentesis', 'procedureevents', 'Procedures', None, 'Process', None, None),
    (225436, 'Family meeting held', 'Family meeting held', 'procedureevents', 'Communication', None, 'Process', None, None),
    (225802, 'Dialysis - CRRT', 'Dialysis - CRRT', 'procedureevents', 'Dialysis', None, 'Process', None, None),
]
# ordercategoryname, ordercategorydescription, amountuom, rateuom
INPUT_INFO = {
    'NaCl 0.9%': ('02-Fluids (Crystalloids)', 'Continuous IV', 'ml', 'mL/hour'),
    'LR': ('02-Fluids (Crystalloids)', 'Continuous IV', 'ml', 'mL/hour'),
    'Dextrose 5%': ('02-Fluids (Crystalloids)', 'Continuous IV', 'ml', 'mL/hour'),
    'Furosemide (Lasix)': ('05-Med Bolus', 'Drug Push', 'mg', ''),
    'Vancomycin': ('08-Antibiotics (IV)', 'Drug Push', 'dose', ''),
    'Piperacillin/Tazobactam (Zosyn)': ('08-Antibiotics (IV)', 'Drug Push', 'dose', ''),
    'Cefepime': ('08-Antibiotics (IV)', 'Drug Push', 'dose', ''),
    'Propofol': ('01-Drips', 'Continuous Med', 'mg', 'mcg/kg/min'),
    'Norepinephrine': ('01-Drips', 'Continuous Med', 'mg', 'mcg/kg/min'),
    'Heparin Sodium (Prophylaxis)': ('11-Prophylaxis (Non IV)', 'Drug Push', 'units', ''),
}
# ordercategoryname, ordercategorydescription, location, locationcategory
PROC_INFO = {
    'Chest X-Ray': ('Imaging', 'Task', '', ''), 'CT scan': ('Imaging', 'Task', '', ''),
    'Invasive Ventilation': ('Ventilation', 'Task', '', ''),
    'Intubation': ('Intubation/Extubation', 'Task', '', ''), 'Extubation': ('Intubation/Extubation', 'Task', '', ''),
    'Arterial Line': ('Invasive Lines', 'Task', 'Left Radial', 'Invasive Arterial'),
    'Multi Lumen': ('Invasive Lines', 'Task', 'Right IJ', 'Invasive Venous'),
    '20 Gauge': ('Peripheral Lines', 'Task', 'Left Antecubital', 'Peripheral'),
    'Chest Tube Placed': ('Procedures', 'Task', 'Right Chest', ''), 'Thoracentesis': ('Procedures', 'Task', '', ''),
    'Family meeting held': ('Communication', 'Task', '', ''), 'Dialysis - CRRT': ('Dialysis', 'Task', '', ''),
}
D_ITEMS = {r[1]: dict(itemid=r[0], input=INPUT_INFO.get(r[1]), proc=PROC_INFO.get(r[1])) for r in D_ITEM_ROWS}


def _num(x, uom, nd=0):
  x = round(float(x), nd) if nd else float(round(float(x)))
  return f'{x:g}', x, uom


def _fio2(v, intub, r):
  f = 21.0 if v['spo2'] > 94 and not intub else float(min(100, 30 + 4 * max(0, 96 - v['spo2']) + (20 if intub else 0)))
  return (*_num(f, None), 0)


def _device(v, intub, r):
  return ('Endotracheal tube' if intub else 'Nasal cannula' if v['spo2'] < 95 else 'None'), None, None, 0


CHART_PLAN = [  # itemid, every N hours, value(vit, intubated, rng) -> (value, valuenum, valueuom, warning)
    (220045, 1, lambda v, i, r: (*_num(v['hr'], 'bpm'), int(v['hr'] > 120))),
    (220179, 1, lambda v, i, r: (*_num(v['sbp'], 'mmHg'), int(v['sbp'] < 90))),
    (220180, 1, lambda v, i, r: (*_num(v['sbp'] * 0.55 + r.normal(0, 4), 'mmHg'), 0)),
    (220181, 2, lambda v, i, r: (*_num(v['sbp'] * 0.7 + r.normal(0, 3), 'mmHg'), 0)),
    (220210, 1, lambda v, i, r: (*_num(v['rr'], 'insp/min'), int(v['rr'] > 28))),
    (220277, 1, lambda v, i, r: (*_num(v['spo2'], '%'), int(v['spo2'] < 90))),
    (223761, 4, lambda v, i, r: (*_num(v['temp'], '°F', 1), int(v['temp'] > 101))),
    (223835, 4, _fio2), (226732, 4, _device),
    (223834, 4, lambda v, i, r: (*_num(0 if v['spo2'] > 95 else min(15, 2 + (96 - v['spo2'])), 'L/min'), 0)),
    (220224, 8, lambda v, i, r: (*_num(v['po2'], 'mmHg'), int(v['po2'] < 60))),
    (220074, 2, lambda v, i, r: (*_num(8 + r.normal(0, 3), 'mmHg'), 0)),
    (223791, 4, lambda v, i, r: (str(r.choice(['None', 'None', 'Mild', 'Moderate'])), None, None, 0)),
    (228096, 4, lambda v, i, r: (' -2 Light sedation' if i else ' 0  Alert and calm', -2.0 if i else 0.0, None, 0)),
    (224639, 24, lambda v, i, r: (*_num(80 + r.normal(0, 1), 'kg', 1), 0)),
    (220739, 4, lambda v, i, r: ('Spontaneously', 4.0, None, 0)),
    (223900, 4, lambda v, i, r: ('No Response-ETT' if i else 'Oriented', 1.0 if i else 5.0, None, 0)),
    (223901, 4, lambda v, i, r: ('Obeys Commands', 6.0, None, 0)),
    (224080, 4, lambda v, i, r: ('30 degrees', None, None, 0)),
    (224054, 12, lambda v, i, r: ('No Impairment', 4.0, None, 0)),
]

ICU_UNITS = ['Medical Intensive Care Unit (MICU)', 'Surgical Intensive Care Unit (SICU)',
             'Cardiac Vascular Intensive Care Unit (CVICU)', 'Medical/Surgical Intensive Care Unit (MICU/SICU)',
             'Coronary Care Unit (CCU)', 'Trauma SICU (TSICU)']

# ------------------------------------------------------------------- prescriptions
# selected (antibiotic / cardiac_lung lists) and dropped (other drugs, tobramycin / coq10 names)
HOME_MEDS = ['Heparin', 'Metoprolol Tartrate', 'Aspirin', 'Atorvastatin', 'Albuterol 0.083% Neb Soln',
             'Ipratropium Bromide Neb', 'Lisinopril', 'amLODIPine', 'Enoxaparin Sodium',
             'Docusate Sodium', 'Senna', 'Pantoprazole', 'Ondansetron', 'Bisacodyl', 'Polyethylene Glycol',
             'Sodium Chloride 0.9%  Flush', 'Insulin', 'OxyCODONE (Immediate Release)', 'Lorazepam',
             'coQ10 200mg', 'Tobramycin-Dexamethasone Ophth Susp', 'Tobramycin Inhalation Soln']
ABX_PRESCRIPTIONS = ['Vancomycin', 'Piperacillin-Tazobactam', 'CefTRIAXone', 'Levofloxacin', 'Azithromycin',
                     'CefePIME', 'MetroNIDAZOLE', 'Meropenem']
ABX_IV = ['Vancomycin', 'Piperacillin/Tazobactam (Zosyn)', 'Cefepime']
# drug: drug_type, form_rx, prod_strength, form_unit_disp, dose_val_rx, dose_unit_rx, route
PRESCRIPTION_INFO = {
    'Heparin': ('MAIN', '', '5000 Units / mL- 1mL Vial', 'mL', '5000', 'UNIT', 'SC'),
    'Enoxaparin Sodium': ('MAIN', '', '40mg/0.4mL Syringe', 'SYR', '40', 'mg', 'SC'),
    'Albuterol 0.083% Neb Soln': ('MAIN', '', '2.5mg/3mL Neb Soln', 'NEB', '1', 'NEB', 'IH'),
    'Ipratropium Bromide Neb': ('MAIN', '', '0.02% 2.5mL Neb Soln', 'NEB', '1', 'NEB', 'IH'),
    'Tobramycin Inhalation Soln': ('MAIN', '', '300mg/5mL Neb', 'NEB', '300', 'mg', 'IH'),
    'Tobramycin-Dexamethasone Ophth Susp': ('MAIN', '', '5mL Bottle', 'BTL', '1', 'DROP', 'BOTH EYES'),
    'Sodium Chloride 0.9%  Flush': ('MAIN', '', '10 mL Syringe', 'SYR', '3', 'mL', 'IV'),
    'Insulin': ('MAIN', '', '100 Units / mL - 10 mL Vial', 'VIAL', '0', 'UNIT', 'SC'),
    'Furosemide': ('MAIN', '', '40mg/4mL Vial', 'VIAL', '40', 'mg', 'IV'),
    'Acetaminophen': ('MAIN', '', '325mg Tablet', 'TAB', '650', 'mg', 'PO/NG'),
    'Vancomycin': ('MAIN', '', '1g Vial', 'VIAL', '1000', 'mg', 'IV'),
    'Piperacillin-Tazobactam': ('MAIN', '', '4.5 g Vial', 'VIAL', '4.5', 'g', 'IV'),
    'CefTRIAXone': ('MAIN', '', '1gm Vial', 'VIAL', '1', 'gm', 'IV'),
    'CefePIME': ('MAIN', '', '2g Vial', 'VIAL', '2', 'g', 'IV'),
    'Meropenem': ('MAIN', '', '1g Vial', 'VIAL', '1000', 'mg', 'IV'),
    'Levofloxacin': ('MAIN', '', '750mg Tablet', 'TAB', '750', 'mg', 'PO/NG'),
    'Azithromycin': ('MAIN', '', '250 mg Tab', 'TAB', '500', 'mg', 'PO/NG'),
    'MetroNIDAZOLE': ('MAIN', '', '500mg Tablet', 'TAB', '500', 'mg', 'PO/NG'),
}

# ------------------------------------------------------------------- microbiology
# spec_type_desc: (spec_itemid, [(test_itemid, test_name), ...]); selected: SPUTUM, PLEURAL FLUID
MICRO = {
    'MRSA SCREEN': (70091, [(90197, 'MRSA SCREEN')]),
    'SPUTUM': (70062, [(90039, 'GRAM STAIN'), (90135, 'RESPIRATORY CULTURE')]),
    'BLOOD CULTURE': (70012, [(90201, 'Blood Culture, Routine')]),
    'PLEURAL FLUID': (70051, [(90039, 'GRAM STAIN'), (90089, 'FLUID CULTURE')]),
    'URINE': (70079, [(90039, 'URINE CULTURE')]),
}
ORGANISMS = [(80023, 'STAPH AUREUS COAG +'), (80026, 'PSEUDOMONAS AERUGINOSA'),
             (80004, 'KLEBSIELLA PNEUMONIAE'), (80155, 'STREPTOCOCCUS PNEUMONIAE')]
SENSITIVITIES = [(90004, 'CEFTAZIDIME'), (90012, 'GENTAMICIN'), (90015, 'VANCOMYCIN')]


# ---------------------------------------------------------------------------- table writers
def chart_hour(sim, ctx, ts, h, vit, intubated):
  rng = sim.rng
  for itemid, every, fn in CHART_PLAN:
    if h % every:
      continue
    value, num, uom, warn = fn(vit, intubated, rng)
    t = ts + int(rng.integers(0, 3000))
    sim.add('icu/chartevents', subject_id=ctx['p']['subject_id'], hadm_id=ctx['hadm'], stay_id=ctx['stay'],
            caregiver_id=sim.cg(), charttime=fmt_time(t), storetime=fmt_time(t + int(rng.integers(30, 5400))),
            itemid=itemid, value=value, valuenum=num, valueuom=uom, warning=warn)


def icu_inputs(sim, ctx, ts, h, vit, intubated, abx_h, diur_h) -> float:
  rng = sim.rng
  given = 0.0
  if h % 8 == 0:
    rate = float(rng.choice([50, 75, 100, 125]))
    add_input(sim, ctx, str(rng.choice(['NaCl 0.9%', 'LR', 'Dextrose 5%'])), ts, amount=rate * 8, dur_min=480, rate=rate)
    given += rate
  if abx_h > 0 and h >= abx_h and (h - abx_h) % 12 == 0:
    add_input(sim, ctx, ABX_IV[int((h // 97) % len(ABX_IV))], ts + int(rng.integers(0, 3600)), amount=1, dur_min=60)
  if h == diur_h:
    add_input(sim, ctx, 'Furosemide (Lasix)', ts + int(rng.integers(0, 3600)), amount=40, dur_min=1)
  if intubated and h % 6 == 0:
    add_input(sim, ctx, 'Propofol', ts, amount=float(round(rng.uniform(100, 400), 1)), dur_min=360, rate=round(rng.uniform(10, 50), 1))
  if vit['sbp'] < 92 and h % 4 == 0:
    add_input(sim, ctx, 'Norepinephrine', ts, amount=float(round(rng.uniform(0.5, 3), 3)), dur_min=240, rate=round(rng.uniform(0.03, 0.2), 3))
  if h % 12 == 6:
    add_input(sim, ctx, 'Heparin Sodium (Prophylaxis)', ts, amount=5000, dur_min=1)
  return given


def add_input(sim, ctx, label, ts, amount, dur_min, rate=None, bolus=False):
  rng = sim.rng
  item = D_ITEMS[label]
  cat, cat_desc, uom, rate_uom = item['input']
  if bolus:
    cat, cat_desc = '03-IV Fluid Bolus', 'Bolus'
  oid = sim.new_id('order', 100000, (1, 9))
  sim.add('icu/inputevents', subject_id=ctx['p']['subject_id'], hadm_id=ctx['hadm'], stay_id=ctx['stay'], caregiver_id=sim.cg(),
          starttime=fmt_time(ts), endtime=fmt_time(ts + dur_min * 60), storetime=fmt_time(ts + int(rng.integers(60, 7200))),
          itemid=item['itemid'], amount=float(amount), amountuom=uom, rate=rate, rateuom=rate_uom if rate is not None else '',
          orderid=oid, linkorderid=oid, ordercategoryname=cat, secondaryordercategoryname='Additive' if rate is None and uom == 'mg' else '',
          ordercomponenttypedescription='Main order parameter', ordercategorydescription=cat_desc,
          patientweight=ctx['p']['weight'], totalamount=float(amount) if rate is None else 1000.0, totalamountuom=uom,
          isopenbag=int(rate is not None and uom == 'ml'), continueinnextdept=0,
          statusdescription=str(rng.choice(['FinishedRunning', 'FinishedRunning', 'Stopped', 'ChangeDoseRate'])),
          originalamount=float(amount), originalrate=rate if rate is not None else float(amount))


def add_procedure(sim, ctx, label, ts, minutes):
  rng = sim.rng
  if ctx['stay'] is None:
    return
  item = D_ITEMS[label]
  cat, cat_desc, loc, loc_cat = item['proc']
  oid = sim.new_id('order', 100000, (1, 9))
  sim.add('icu/procedureevents', subject_id=ctx['p']['subject_id'], hadm_id=ctx['hadm'], stay_id=ctx['stay'],
          caregiver_id=sim.cg(), starttime=fmt_time(ts), endtime=fmt_time(ts + max(minutes, 1) * 60),
          storetime=fmt_time(ts + max(minutes, 1) * 60 + int(rng.integers(60, 3600))), itemid=item['itemid'],
          value=float(minutes), valueuom='min' if minutes > 1 else 'None', location=loc, locationcategory=loc_cat,
          orderid=oid, linkorderid=oid, ordercategoryname=cat, ordercategorydescription=cat_desc,
          patientweight=ctx['p']['weight'], isopenbag=0, continueinnextdept=0,
          statusdescription='FinishedRunning' if minutes > 1 else 'FinishOnTime', ORIGINALAMOUNT=float(minutes), ORIGINALRATE=int(minutes > 1))


def prescribe(sim, ctx, name, ts, n, stop_h=None):
  rng = sim.rng
  d = PRESCRIPTION_INFO.get(name, ('MAIN', 'TAB', '1 Tablet', 'TAB', '1', 'TAB', 'PO/NG'))
  stop = ts + int((stop_h or rng.uniform(24, 120)) * HOUR)
  seq = sim.new_id('poe_seq_%d' % ctx['p']['subject_id'], 0, (1, 5))
  sim.add('hosp/prescriptions', subject_id=ctx['p']['subject_id'], hadm_id=ctx['hadm'],
          pharmacy_id=sim.new_id('pharm', 10000000, (1, 900)), poe_id=f"{ctx['p']['subject_id']}-{seq}", poe_seq=seq,
          order_provider_id=sim.prov(), starttime=fmt_time(ts), stoptime=fmt_time(stop), drug_type=d[0], drug=name,
          formulary_drug_cd=(''.join(c for c in name.upper() if c.isalpha())[:6] + str(int(rng.integers(1, 9)))),
          gsn='%06d' % int(rng.integers(1000, 80000)), ndc='%011d' % int(rng.integers(1e8, 9e10)), prod_strength=d[2],
          form_rx=d[1] if rng.random() < 0.2 else '', dose_val_rx=d[4], dose_unit_rx=d[5], form_val_disp=d[4],
          form_unit_disp=d[3], doses_per_24_hrs=float(rng.choice([1, 2, 3, 4])), route=d[6])


def add_labs(sim, p, hadm_id, ts, panels, vit, blank_hadm=False):
  rng = sim.rng
  spec = sim.new_id('specimen', 1000000, (1, 5000))
  for panel in panels:
    for itemid in LAB_PANELS[panel]:
      value, num, uom, lo, hi, flag = lab_value(itemid, vit, rng)
      sim.add('hosp/labevents', subject_id=p['subject_id'], hadm_id=None if blank_hadm or rng.random() < 0.08 else hadm_id,
              specimen_id=spec, itemid=itemid, order_provider_id=sim.prov() if rng.random() < 0.5 else '',
              charttime=fmt_time(ts), storetime=fmt_time(ts + int(rng.integers(600, 7200))), value=value, valuenum=num,
              valueuom=uom, ref_range_lower=lo, ref_range_upper=hi, flag=flag,
              priority=str(rng.choice(['STAT', 'ROUTINE'])) if panel != 'bg' else 'STAT',
              comments='___' if rng.random() < 0.03 else '')


def add_micro(sim, ctx, spec_desc, ts, pos):
  rng = sim.rng
  spec_itemid, tests = MICRO[spec_desc]
  spec = sim.new_id('mspec', 5000000, (1, 5000))
  base = dict(subject_id=ctx['p']['subject_id'], hadm_id=ctx['hadm'], micro_specimen_id=spec, order_provider_id=sim.prov(),
              chartdate=fmt_date(ts), charttime='' if rng.random() < 0.1 else fmt_time(ts), spec_itemid=spec_itemid,
              spec_type_desc=spec_desc, test_seq=1, storedate=fmt_date(ts + 2 * 86400), storetime=fmt_time(ts + 2 * 86400 + 3600))
  for test_itemid, test_name in tests:
    if not pos or 'CULTURE' not in test_name.upper():
      sim.add('hosp/microbiologyevents', microevent_id=sim.new_id('micro', 0, (1, 2)), **base, test_itemid=test_itemid,
              test_name=test_name, comments=_MICRO_NEG.get(test_name, 'NO GROWTH.'))
      continue
    org_itemid, org_name = ORGANISMS[int(rng.integers(len(ORGANISMS)))]
    for ab_itemid, ab_name in SENSITIVITIES:
      dil = float(rng.choice([0.5, 1, 2, 4, 16]))
      sim.add('hosp/microbiologyevents', microevent_id=sim.new_id('micro', 0, (1, 2)), **base, test_itemid=test_itemid,
              test_name=test_name, org_itemid=org_itemid, org_name=org_name, isolate_num=1,
              quantity=str(rng.choice(['MODERATE GROWTH', 'SPARSE GROWTH', ''])), ab_itemid=ab_itemid, ab_name=ab_name,
              dilution_text=f'<={dil:g}', dilution_comparison='<=        ', dilution_value=dil,
              interpretation=str(rng.choice(['S', 'S', 'R', 'I'])), comments='')


_MICRO_NEG = {'GRAM STAIN': 'NO POLYMORPHONUCLEAR LEUKOCYTES SEEN.', 'MRSA SCREEN': 'No MRSA isolated.'}
