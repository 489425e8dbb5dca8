"""`ehrxdiff demo-data`: a small synthetic database in the MIMIC-IV 2.2 + MIMIC-CXR-JPG 2.0.0 + Chest ImaGenome
1.0.0 formats.

Every patient carries a latent clinical state, simulated hour by hour through each admission:
infection (lung opacity), fluid balance (pleural effusion, oedema, cardiac size), pneumothorax and
support devices. The state produces the observations (fever, CRP, PaO2, SpO2, ... in labevents and
chartevents), the clinicians react to them (antibiotics, furosemide, fluid boluses, intubation,
thoracentesis, chest tube, in prescriptions / inputevents / procedureevents) and the reactions act
back on the state. Chest X-ray studies are drawn at realistic times; the state at the study time
decides the picture (`synthetic_images`), the CheXpert labels and the Chest ImaGenome labels.
Demographics vary (gender, anchor_age, MIMIC race strings) and leave a weak, learnable trace in the
pictures, as in real radiographs: a wider thorax and thinner soft tissue for men, breast shadows for
women, lower bone contrast with age (`synthetic_images.random_anatomy`).
Nothing here refers to real people: all identifiers are random.
"""
from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import os
import time

import numpy as np
from tqdm import tqdm

from data_prep import schema
from data_prep import synthetic_images as simg
from data_prep.synthetic_imagenome import write_release as write_imagenome
from data_prep.synthetic_events import (ABX_PRESCRIPTIONS, D_ITEM_ROWS, D_LABITEMS, HOME_MEDS, HOUR, ICU_UNITS, T0,
                                        add_input, add_labs, add_micro, add_procedure, chart_hour, fmt_date,
                                        fmt_time, icu_inputs, prescribe)
from ehrxdiff_jax import outputs

DEFAULT_PATIENTS = 40


def _clip(x, lo=0.0, hi=1.0) -> float:
  return float(min(max(x, lo), hi))


class _Sim:
  """Holds the random generator, the id counters and the output rows."""

  def __init__(self, seed: int):
    self.rng = np.random.default_rng(seed)
    self.seed = seed
    self.rows = {name: [] for name in schema.MIMIC_COLUMNS}
    self.studies = []
    self.ids = {}
    self.providers = ['P' + ''.join(self.rng.choice(list('0123456789ABCDEFGHJKLMNPQRSTUVWXYZ'), 5))
                      for _ in range(40)]
    self.caregivers = [int(v) for v in self.rng.choice(np.arange(10000, 99999), 60, replace=False)]

  def new_id(self, kind: str, start: int, step=(1, 40)) -> int:
    self.ids[kind] = self.ids.get(kind, start) + int(self.rng.integers(*step))
    return self.ids[kind]

  def unique(self, kind: str, lo: int, hi: int) -> int:
    used = self.ids.setdefault('used_' + kind, set())
    while True:
      v = int(self.rng.integers(lo, hi))
      if v not in used:
        used.add(v)
        return v

  def add(self, table: str, **row):
    self.rows[table].append(row)

  def prov(self):
    return self.providers[int(self.rng.integers(len(self.providers)))]

  def cg(self):
    return self.caregivers[int(self.rng.integers(len(self.caregivers)))]


# ---------------------------------------------------------------------------- patients / stays
# admissions.race values as spelled in MIMIC-IV 2.2, with rough relative frequencies.
RACES = (('WHITE', 0.55), ('BLACK/AFRICAN AMERICAN', 0.14), ('WHITE - OTHER EUROPEAN', 0.04),
         ('HISPANIC/LATINO - PUERTO RICAN', 0.04), ('HISPANIC OR LATINO', 0.03), ('ASIAN - CHINESE', 0.03),
         ('ASIAN', 0.03), ('OTHER', 0.06), ('UNKNOWN', 0.06), ('UNABLE TO OBTAIN', 0.02))


def _patient(sim: _Sim, subject_id: int, minor: bool):
  rng = sim.rng
  age = int(rng.integers(15, 18)) if minor else int(_clip(rng.normal(64, 15), 19, 91))
  anchor_year = int(rng.integers(2110, 2185))
  sex = str(rng.choice(['F', 'M']))
  race = RACES[int(rng.choice(len(RACES), p=[w / sum(w for _, w in RACES) for _, w in RACES]))][0]
  p = dict(subject_id=subject_id, age=age, anchor_year=anchor_year, sex=sex, race=race,
           heart_base=float(_clip(rng.normal(0.3, 0.14) + 0.1 * (age > 72), 0.05, 0.9)),
           anat=simg.random_anatomy(rng, sex=sex, age=age), widening=float(rng.random() < 0.04),
           weight=round(float(rng.normal(86 if sex == 'M' else 72, 14)), 1))
  p['chf'] = p['heart_base'] > 0.45
  t = ((anchor_year - 2100) * 365.25 + rng.uniform(0, 300 if minor else 700)) * 86400
  died = None
  n_adm = int(rng.choice([1, 1, 2, 2, 3]))
  first_t = t
  for i in range(n_adm):
    los_h = float(rng.uniform(70, 280))
    hadm_id = sim.unique('hadm', 20000000, 30000000)
    death = i == n_adm - 1 and rng.random() < 0.08
    _admission(sim, p, hadm_id, int(t), los_h, death)
    if death:
      died = t + los_h * HOUR
    t += los_h * HOUR + rng.uniform(20, 400) * 86400
  # studies outside any admission (outpatient PA + lateral), with a few outpatient labs
  for _ in range(int(rng.integers(0, 3))):
    ts = first_t - rng.uniform(15, 200) * 86400 if rng.random() < 0.6 or died else t
    st = dict(effusion=0.15 * p['chf'] * rng.random(), opacity=0.0, edema=0.0, inf=0.0,
              heart=p['heart_base'], ptx=0.0, devices=False)
    _study(sim, p, None, int(ts + rng.uniform(9, 17) * HOUR), st, ['PA', 'LATERAL'])
    add_labs(sim, p, None, int(ts + rng.uniform(8, 16) * HOUR), ['chem'], st, blank_hadm=True)
  dod = '' if died is None and rng.random() > 0.1 else fmt_date(died or t + rng.uniform(30, 900) * 86400)[:10]
  group = ['2008 - 2010', '2011 - 2013', '2014 - 2016', '2017 - 2019', '2020 - 2022'][int(rng.integers(5))]
  sim.add('hosp/patients', subject_id=subject_id, gender=sex, anchor_age=age,
          anchor_year=anchor_year, anchor_year_group=group, dod=dod)


def _admission(sim: _Sim, p: dict, hadm_id: int, t0: int, los_h: float, death: bool):
  rng = sim.rng
  sid = p['subject_id']
  n = int(los_h)
  icu = rng.random() < 0.8
  ed = rng.random() < 0.7
  a = dict(subject_id=sid, hadm_id=hadm_id, admittime=fmt_time(t0), dischtime=fmt_time(t0 + n * HOUR),
           deathtime=fmt_time(t0 + n * HOUR) if death else '',
           admission_type=str(rng.choice(['EW EMER.', 'EW EMER.', 'URGENT', 'OBSERVATION ADMIT', 'DIRECT EMER.', 'ELECTIVE'])),
           admit_provider_id=sim.prov(),
           admission_location='EMERGENCY ROOM' if ed else str(rng.choice(['TRANSFER FROM HOSPITAL', 'PHYSICIAN REFERRAL', 'WALK-IN/SELF REFERRAL'])),
           discharge_location='DIED' if death else str(rng.choice(['HOME', 'HOME HEALTH CARE', 'SKILLED NURSING FACILITY', 'REHAB', ''])),
           insurance=str(rng.choice(['Medicare', 'Medicaid', 'Other'])), language=str(rng.choice(['ENGLISH'] * 5 + ['?'])),
           marital_status=str(rng.choice(['MARRIED', 'SINGLE', 'WIDOWED', 'DIVORCED', ''])), race=p['race'],
           edregtime=fmt_time(t0 - rng.uniform(2, 9) * HOUR) if ed else '',
           edouttime=fmt_time(t0 + rng.uniform(0, 1) * HOUR) if ed else '', hospital_expire_flag=int(death))
  sim.add('hosp/admissions', **a)
  icu_in, icu_out, stay_id = -1, -1, None
  if icu:
    icu_in = int(rng.uniform(0.5, min(30, n / 3)))
    icu_out = int(min(n - 6, icu_in + rng.uniform(36, 150)))
    stay_id = sim.unique('stay', 30000000, 40000000)
    unit = ICU_UNITS[int(rng.integers(len(ICU_UNITS)))]
    last = unit if rng.random() < 0.9 else ICU_UNITS[int(rng.integers(len(ICU_UNITS)))]
    sim.add('icu/icustays', subject_id=sid, hadm_id=hadm_id, stay_id=stay_id, first_careunit=unit,
            last_careunit=last, intime=fmt_time(t0 + icu_in * HOUR + 600), outtime=fmt_time(t0 + icu_out * HOUR + 900),
            los=round((icu_out - icu_in + 300 / 3600) / 24, 6))
  _course(sim, p, hadm_id, stay_id, t0, n, icu_in, icu_out)


def _course(sim, p, hadm_id, stay_id, t0, n, icu_in, icu_out):
  """Hour-by-hour state, observations, treatments and studies of one admission."""
  rng = sim.rng
  sid = p['subject_id']
  ctx = dict(p=p, hadm=hadm_id, stay=stay_id, t0=t0)
  has_inf = rng.random() < 0.7
  h_on = rng.uniform(-24, 0.5 * n) if has_inf else 1e9
  g_inf = rng.uniform(0.025, 0.06)
  chf_exac = p['chf'] and rng.random() < 0.7 or rng.random() < 0.15
  ptx_on = rng.uniform(6, n / 2) if rng.random() < 0.08 else 1e9
  inf, fl = (0.25 if h_on < 0 else 0.0), 0.15 + (0.25 if chf_exac else 0.0) * rng.random()
  eff = max(0.0, 1.1 * (fl - 0.3))
  ed, ptx = 0.0, 0.0
  abx_h = diur_h = thora_h = tube_h = intub_h = -1e9
  last_study = -1e9
  fluid_in = np.zeros(n + 24)
  states = []
  intubated = False
  # home medications at admission (kept and dropped names) and admission screening cultures
  for drug in rng.choice(len(HOME_MEDS), int(rng.integers(3, 8)), replace=False):
    prescribe(sim, ctx, HOME_MEDS[int(drug)], t0 + int(rng.uniform(1, 6) * HOUR), n)
  add_micro(sim, ctx, 'MRSA SCREEN', t0 + int(rng.uniform(1, 8) * HOUR), pos=False)
  for h in range(n):
    in_icu = icu_in <= h < icu_out
    ts = t0 + h * HOUR
    # --- state dynamics
    if h >= h_on:
      inf = max(inf, 0.08)
      inf = inf - 0.035 * inf - 0.004 if h > abx_h + 8 > 0 else inf + g_inf * (1.05 - inf)
      inf = float(_clip(inf, 0, 1))
    # fluid balance: IV fluids in, renal clearance (poor in heart failure) and diuretics out
    diuresis = 0.04 if 0 <= h - diur_h < 8 else 0.0
    clearance = 0.008 if p['chf'] else 0.02
    fl += 1.5e-4 * fluid_in[h] - diuresis - clearance * (fl - 0.15) + (0.015 if chf_exac and h < n * 0.5 else 0)
    fl = float(_clip(fl, 0, 1))
    eff += 0.06 * (_clip(1.5 * (fl - 0.25) + 0.4 * inf, 0, 1) - eff)
    ed += 0.1 * (_clip(2.2 * (fl - 0.35), 0, 1) - ed)
    if h >= ptx_on and h < ptx_on + 1:
      ptx = rng.uniform(0.5, 0.85)
    ptx = ptx * (0.93 if h > tube_h + 1 > 0 else 1.0)
    heart = float(_clip(p['heart_base'] + 0.3 * fl, 0, 1))
    st = dict(fl=fl, inf=inf, opacity=inf, effusion=float(eff), edema=float(ed), heart=heart, ptx=ptx,
              devices=bool(intubated or (in_icu and h - icu_in > 2)), widening=p['widening'])
    states.append(st)
    # --- observations (the state shows in vital signs and labs)
    vit = dict(temp=98.2 + 5.0 * inf + rng.normal(0, 0.4), hr=78 + 30 * inf + 12 * fl + rng.normal(0, 5),
               spo2=float(_clip(98.5 - 9 * inf - 12 * ed - 5 * eff - 8 * ptx + rng.normal(0, 1), 70, 100)),
               sbp=128 - 35 * inf ** 2 + rng.normal(0, 8), rr=15 + 10 * max(inf, ed, ptx) + rng.normal(0, 2))
    vit['po2'] = float(_clip(98 - 50 * inf - 40 * ed - 20 * ptx + rng.normal(0, 6) + (40 if intubated else 0), 38, 300))
    vit['crp'] = max(0.3, 4 + 230 * inf + rng.normal(0, 6))
    vit['wbc'] = max(1.0, 7 + 12 * inf + rng.normal(0, 1))
    vit['bnp'] = max(20, 300 + 9000 * fl ** 2 + rng.normal(0, 100))
    vit['inf'] = inf
    bg = in_icu and h % (4 if intubated else 8) == int(rng.integers(0, 2))
    morning = (h + t0 // HOUR) % 24 == 5
    if in_icu:
      chart_hour(sim, ctx, ts, h, vit, intubated)
      if bg:
        add_labs(sim, p, hadm_id, ts + int(rng.integers(60, 3000)), ['bg'], vit)
      fluid_in[h:h + 8] += icu_inputs(sim, ctx, ts, h, vit, intubated, abx_h, diur_h)
      if h % 2 == 0:
        sim.add('icu/outputevents', subject_id=sid, hadm_id=hadm_id, stay_id=stay_id, caregiver_id=sim.cg(),
                charttime=fmt_time(ts + 1800), storetime=fmt_time(ts + 1800 + int(rng.integers(60, 3600))),
                itemid=226559, value=float(round(max(5, 90 + rng.normal(0, 30) + (300 if diuresis else 0)))), valueuom='ml')
      if h == icu_in:
        for name in ('20 Gauge', 'Arterial Line', 'Multi Lumen'):
          add_procedure(sim, ctx, name, ts + 1200, int(rng.integers(1440, 5000)))
    if morning:  # morning labs
      add_labs(sim, p, hadm_id, ts + int(rng.integers(0, 3600)), ['chem', 'cbc'] + (['crp'] if has_inf or rng.random() < 0.3 else [])
            + (['bnp'] if p['chf'] and rng.random() < 0.5 else []) + (['urine'] if rng.random() < 0.2 else []), vit)
    # --- clinicians react
    # only what is measured can be acted upon: temperature every 4 h, CRP in the morning, PaO2 with gases
    if abx_h < 0 and h > 0 and (h % 4 == 0 and vit['temp'] > 100.8 or morning and vit['crp'] > 90 or bg and vit['po2'] < 65):
      abx_h = h + int(rng.integers(1, 6))
      for name in rng.choice(ABX_PRESCRIPTIONS, 2, replace=False):
        prescribe(sim, ctx, name, t0 + abx_h * HOUR + int(rng.integers(0, 3600)), n)
      add_micro(sim, ctx, 'SPUTUM', ts + int(rng.integers(600, 7200)), pos=True)
      add_micro(sim, ctx, 'BLOOD CULTURE', ts + int(rng.integers(600, 7200)), pos=rng.random() < 0.3)
      prescribe(sim, ctx, 'Acetaminophen', ts + int(rng.integers(600, 3600)), n)
    if h - diur_h > 12 and (vit['spo2'] < 93 and fl > 0.45 or morning and vit['bnp'] > 3000):
      diur_h = h + int(rng.integers(1, 3))
      prescribe(sim, ctx, 'Furosemide', t0 + diur_h * HOUR, n, stop_h=24)
    if in_icu and vit['sbp'] < 100 and rng.random() < 0.5:
      fluid_in[h + 1] += 1000
      add_input(sim, ctx, 'NaCl 0.9%', ts + int(rng.integers(0, 3600)), amount=1000, dur_min=60, bolus=True)
    if in_icu and not intubated and vit['spo2'] < 88:
      intubated, intub_h = True, h
      add_procedure(sim, ctx, 'Intubation', ts + 1800, 1)
    if intubated and (vit['spo2'] > 95 and h - intub_h > 24 or h >= icu_out - 2):
      intubated = False
      add_procedure(sim, ctx, 'Invasive Ventilation', t0 + intub_h * HOUR + 1800, (h - intub_h) * 60)
      add_procedure(sim, ctx, 'Extubation', ts + 600, 1)
    if eff > 0.6 and h - thora_h > 48 and rng.random() < 0.06:
      thora_h = h
      eff *= 0.35
      add_procedure(sim, ctx, 'Thoracentesis', ts + 900, 1)
      add_micro(sim, ctx, 'PLEURAL FLUID', ts + 1200, pos=False)
    if ptx > 0.3 and tube_h < ptx_on:
      tube_h = h + int(rng.integers(1, 4))
      if in_icu:
        add_procedure(sim, ctx, 'Chest Tube Placed', t0 + tube_h * HOUR, int(rng.integers(2000, 6000)))
    if in_icu and rng.random() < 0.01:
      add_procedure(sim, ctx, str(rng.choice(['Family meeting held', 'Dialysis - CRRT', 'CT scan'])), ts + 600, 1)
    # --- chest X-rays
    daily = in_icu and (h + t0 // HOUR) % 24 == 4 and rng.random() < 0.85
    event = (h in (0, 1) and rng.random() < 0.5) or h == intub_h + 1 or h == thora_h + 2 or h == tube_h + 2 \
        or (in_icu and vit['spo2'] < 90 and h - last_study > 12 and rng.random() < 0.3)
    ward = not in_icu and h - last_study > 30 and 9 <= (h + t0 // HOUR) % 24 <= 17 and rng.random() < 0.06
    if daily or event or ward:
      last_study = h
      st_time = ts + int(rng.integers(0, 3600))
      views = ['AP'] if in_icu or intubated or rng.random() < 0.3 else ['PA', 'LATERAL']
      if in_icu and rng.random() < 0.1:
        views = ['AP', 'LL']
      _study(sim, p, hadm_id, st_time, dict(states[-1]), views)
      if in_icu:
        add_procedure(sim, ctx, 'Chest X-Ray', st_time, 1)
  # a few labs drawn during the admission without a hadm_id (as in MIMIC-IV)
  for _ in range(int(rng.integers(1, 4))):
    h = int(rng.integers(0, n))
    add_labs(sim, p, hadm_id, t0 + h * HOUR + int(rng.integers(0, 3600)), ['chem'], dict(crp=0, wbc=8, bnp=300, po2=90), blank_hadm=True)


def _study(sim, p, hadm_id, ts, state, views):
  study_id = sim.unique('study', 50000000, 60000000)
  sim.studies.append(dict(subject_id=p['subject_id'], study_id=study_id, hadm_id=hadm_id, time=int(ts),
                          state=state, views=list(views), anat=p['anat']))

# ---------------------------------------------------------------------------- labels
def imagenome_labels(st: dict) -> dict:
  """The 10 Chest ImaGenome findings (0/1) of a state; thresholds match what `render` draws."""
  op, ed = st['opacity'], st['edema']
  return dict(consolidation=op > 0.5, enlarged_cardiac_silhouette=st['heart'] > 0.55, enlarged_hilum=ed > 0.5,
              lung_opacity=op > 0.25 or ed > 0.35, mediastinal_widening=st.get('widening', 0) > 0.5,
              pleural_effusion=st['effusion'] > 0.3, pneumonia=op > 0.45, pneumothorax=st['ptx'] > 0.15,
              pulmonary_edema_hazy_opacity=ed > 0.35, vascular_congestion=ed > 0.2)


def chexpert_labels(st: dict, nodule: bool, rng) -> dict:
  """CheXpert-style report labels: 1.0 clearly present, -1.0 borderline (uncertain), 0.0 explicitly
  negative or empty (not mentioned)."""
  op, ed, eff = st['opacity'], st['edema'], st['effusion']
  scores = {'Atelectasis': (max(eff - 0.15, 0.8 * op), 0.4), 'Cardiomegaly': (st['heart'], 0.55),
            'Consolidation': (op, 0.5), 'Edema': (ed, 0.35),
            'Enlarged Cardiomediastinum': (max(st['heart'] - 0.05, st.get('widening', 0)), 0.55),
            'Fracture': (0.0, 2.0), 'Lung Lesion': (float(nodule), 0.5), 'Lung Opacity': (max(op, ed), 0.25),
            'Pleural Effusion': (eff, 0.3), 'Pleural Other': (0.0, 2.0), 'Pneumonia': (op, 0.45),
            'Pneumothorax': (st['ptx'], 0.15), 'Support Devices': (float(st['devices']), 0.5)}
  out = {}
  for name in schema.CHEXPERT_LABELS:
    if name == 'No Finding':
      continue
    v, thr = scores[name]
    if v > thr + 0.06:
      out[name] = 1.0
    elif v > max(thr - 0.06, 0.05):
      out[name] = -1.0
    else:
      out[name] = 0.0 if rng.random() < 0.3 and thr < 1 else None
  found = any(out[k] in (1.0, -1.0) for k in out if k != 'Support Devices') or any(imagenome_labels(st).values())
  out['No Finding'] = None if found else 1.0
  return out


# ---------------------------------------------------------------------------- output
def _cell(v):
  if v is None:
    return ''
  if isinstance(v, (bool, np.bool_)):
    return str(int(v))
  if isinstance(v, (float, np.floating)):
    return '' if np.isnan(v) else repr(float(v))
  return str(v)


def _write_csv(path: str, columns, rows, gz=True):
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator='\n')
  w.writerow(columns)
  for r in rows:
    w.writerow([_cell(r.get(c)) for c in columns])
  data = buf.getvalue().encode()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    if gz:
      with gzip.GzipFile(filename='', mode='wb', fileobj=f, mtime=0) as z:
        z.write(data)
    else:
      f.write(data)


_SORT = {'hosp/labevents': 'charttime', 'hosp/prescriptions': 'starttime', 'hosp/microbiologyevents': 'chartdate',
         'icu/chartevents': 'charttime', 'icu/inputevents': 'starttime', 'icu/outputevents': 'charttime',
         'icu/procedureevents': 'starttime', 'hosp/admissions': 'admittime', 'icu/icustays': 'intime'}


def _finish_tables(sim: _Sim) -> list:
  """Sorts rows as in the real files, numbers labevents, adds dictionaries and edge cases."""
  rng = sim.rng
  rows = sim.rows
  for name, col in _SORT.items():
    rows[name].sort(key=lambda r: (r['subject_id'], r[col] or '', str(r.get('itemid', ''))))
  rows['hosp/patients'].sort(key=lambda r: r['subject_id'])
  rows['hosp/d_labitems'] = [dict(itemid=i, label=lab, fluid=f, category=c) for i, lab, f, c in D_LABITEMS]
  rows['icu/d_items'] = [dict(zip(schema.MIMIC_COLUMNS['icu/d_items'], r)) for r in sorted(D_ITEM_ROWS)]
  edge = []
  lab = rows['hosp/labevents']
  if len(lab) >= 3:
    idx = rng.choice(len(lab), 3, replace=False)
    lab[idx[0]]['charttime'] = lab[idx[0]]['charttime'][:5] + '02-30 10:00:00'
    lab[idx[1]]['charttime'] = ''
    lab.insert(int(idx[2]), dict(lab[idx[2]], itemid=99999, value='ERROR', valuenum=None))
    edge.append('labevents: invalid date 02-30, empty charttime, itemid 99999 missing from d_labitems')
  for i, r in enumerate(lab):
    r['labevent_id'] = i + 1
  if rows['hosp/prescriptions']:
    rows['hosp/prescriptions'][int(rng.integers(len(rows['hosp/prescriptions'])))]['starttime'] = ''
    edge.append('prescriptions: one empty starttime')
  ce = rows['icu/chartevents']
  if len(ce) >= 2:
    j = int(rng.integers(len(ce)))
    ce[j]['charttime'] = ce[j]['charttime'][:5] + '13-01 25:00:00'
    k = int(rng.integers(len(ce)))
    ce.insert(k, dict(ce[k]))
    edge.append('chartevents: month 13 / hour 25 timestamp, one duplicated row')
  return edge


def _cxr(sim: _Sim, out: str, progress: bool) -> dict:
  """Edge cases of the studies, then metadata / chexpert / split csvs, the Chest ImaGenome release and the JPEGs."""
  rng = sim.rng
  studies = sorted(sim.studies, key=lambda s: (s['subject_id'], s['time'], s['study_id']))
  in_adm = [s for s in studies if s['hadm_id'] is not None]
  if in_adm:
    twin = dict(in_adm[len(in_adm) // 3], study_id=sim.unique('study', 50000000, 60000000), views=['AP'])
    studies.append(twin)  # a second study at exactly the same time
    ward = [s for s in in_adm if s['views'] == ['PA', 'LATERAL']]
    (ward[len(ward) // 2] if ward else in_adm[-1])['views'] = ['LATERAL']  # a study with only a lateral view
  studies.sort(key=lambda s: (s['subject_id'], s['time'], s['study_id']))
  split = {}
  for sid in sorted({s['subject_id'] for s in studies}):
    split[sid] = str(rng.choice(['train', 'validate', 'test'], p=[0.8, 0.1, 0.1]))
  meta, chex, spl, ig, jobs = [], [], [], [], []
  desc = {'PA': ('CHEST (PA AND LAT)', 'postero-anterior', 'Erect'), 'LATERAL': ('CHEST (PA AND LAT)', 'lateral', 'Erect'),
          'AP': ('CHEST (PORTABLE AP)', 'antero-posterior', ''), 'LL': ('CHEST (PORTABLE AP)', 'left lateral', 'Recumbent')}
  for s in studies:
    t = T0 + dt.timedelta(seconds=s['time'])
    hhmmss = t.hour * 10000 + t.minute * 100 + t.second
    stime = repr(round(hhmmss + (int(rng.integers(0, 1000)) / 1000 if rng.random() < 0.6 else 0), 3) * 1.0)
    chex.append(dict(subject_id=s['subject_id'], study_id=s['study_id'],
                     **chexpert_labels(s['state'], s['anat']['nodule'] is not None, rng)))
    labels = {k: int(v) for k, v in imagenome_labels(s['state']).items()}
    for view in s['views']:
      dicom = '-'.join('%08x' % int(v) for v in rng.integers(0, 2 ** 32, 5))
      proc, vcode, orient = desc[view]
      meta.append(dict(dicom_id=dicom, subject_id=s['subject_id'], study_id=s['study_id'],
                       PerformedProcedureStepDescription=proc, ViewPosition=view, Rows=simg.SIZE, Columns=simg.SIZE,
                       StudyDate=int(t.strftime('%Y%m%d')), StudyTime=stime, ProcedureCodeSequence_CodeMeaning=proc,
                       ViewCodeSequence_CodeMeaning=vcode, PatientOrientationCodeSequence_CodeMeaning=orient))
      spl.append(dict(dicom_id=dicom, study_id=s['study_id'], subject_id=s['subject_id'], split=split[s['subject_id']]))
      ig.append(dict(dicom_id=dicom, study_id=s['study_id'], subject_id=s['subject_id'], **labels))
      sub = str(s['subject_id'])
      jobs.append((os.path.join(out, 'files', 'p' + sub[:2], 'p' + sub, f"s{s['study_id']}", dicom + '.jpg'), s, view))
  cols = schema.CXR_COLUMNS
  _write_csv(os.path.join(out, 'mimic-cxr-2.0.0-metadata.csv.gz'), cols['mimic-cxr-2.0.0-metadata'], meta)
  _write_csv(os.path.join(out, 'mimic-cxr-2.0.0-chexpert.csv.gz'), cols['mimic-cxr-2.0.0-chexpert'], chex)
  _write_csv(os.path.join(out, 'mimic-cxr-2.0.0-split.csv.gz'), cols['mimic-cxr-2.0.0-split'], spl)
  # Chest ImaGenome is a release of its own, next to mimic-cxr/ (data_prep/synthetic_imagenome.py)
  imagenome = write_imagenome(os.path.join(os.path.dirname(out), schema.IMAGENOME_DIR), ig, sim.seed)
  for i, (path, s, view) in enumerate(tqdm(jobs, desc='images', unit='img', disable=not progress)):
    img = simg.render(s['anat'], s['state'], view, np.random.default_rng([sim.seed, i]))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(simg.encode_jpeg(img))
  # (I_prev, I_trg) frontal pairs of the same admission at most 48 h apart
  frontal = [(s['hadm_id'], s['time']) for _, s, v in jobs if v in ('PA', 'AP') and s['hadm_id'] is not None]
  pairs = sum(1 for a in frontal for b in frontal if a[0] == b[0] and 0 < b[1] - a[1] <= 48 * HOUR)
  return dict(studies=len(studies), images=len(jobs), frontal_pairs_48h=pairs,
              studies_outside_admissions=sum(s['hadm_id'] is None for s in studies), **imagenome)


# ---------------------------------------------------------------------------- entry points
def generate(out_dir: str, patients: int = DEFAULT_PATIENTS, seed: int = 0, overwrite: bool = False,
             progress: bool = True) -> dict:
  """Writes the synthetic database under `out_dir` (mimic-iv/, mimic-cxr/, chest-imagenome/); returns a summary."""
  if patients < 1:
    raise ValueError('patients must be >= 1')
  out_dir = outputs.check_writable(out_dir, overwrite, allow_empty=True)
  t_start = time.perf_counter()
  sim = _Sim(seed)
  subject_ids = sorted(sim.unique('subject', 10000000, 20000000) for _ in range(patients))
  minors = set(sim.rng.choice(patients, min(2, patients // 4), replace=False).tolist()) if patients >= 4 else set()
  for k, sid in enumerate(subject_ids):
    _patient(sim, sid, k in minors)
  edge = _finish_tables(sim)
  with outputs.atomic_directory(out_dir, overwrite, allow_empty=True) as tmp:
    for name, cols in schema.MIMIC_COLUMNS.items():
      _write_csv(schema.mimic_path(os.path.join(tmp, schema.MIMIC_IV_DIR), name), cols, sim.rows[name])
    cxr = _cxr(sim, os.path.join(tmp, schema.MIMIC_CXR_DIR), progress)
  rows = {name: len(sim.rows[name]) for name in schema.MIMIC_COLUMNS}
  return dict(out=out_dir, seed=seed, patients=patients, minors=len(minors), admissions=rows['hosp/admissions'],
              icustays=rows['icu/icustays'], **cxr, rows=rows, edge_cases=edge,
              seconds=round(time.perf_counter() - t_start, 2))


def add_arguments(parser) -> None:
  parser.add_argument('--out', required=True, help='output folder (gets mimic-iv/, mimic-cxr/, chest-imagenome/)')
  parser.add_argument('--patients', type=int, default=DEFAULT_PATIENTS, help='number of synthetic patients')
  parser.add_argument('--seed', type=int, default=0, help='random seed (same seed, same files)')
  parser.add_argument('--overwrite', action='store_true', help='replace a non-empty --out')
  parser.add_argument('--no-progress', action='store_true', help='no progress bar')


def run(args) -> int:
  try:
    s = generate(args.out, patients=args.patients, seed=args.seed, overwrite=args.overwrite,
                 progress=not getattr(args, 'no_progress', False))
  except FileExistsError as e:
    print(f'error: {e}')
    return 1
  print(f"wrote {s['out']} in {s['seconds']} s: {s['patients']} patients ({s['minors']} minors), "
        f"{s['admissions']} admissions, {s['icustays']} ICU stays, {s['studies']} studies "
        f"({s['studies_outside_admissions']} outside admissions), {s['images']} images, "
        f"{s['frontal_pairs_48h']} frontal pairs within 48 h")
  for name, n in s['rows'].items():
    print(f'  {name:<26} {n:>8} rows')
  return 0
