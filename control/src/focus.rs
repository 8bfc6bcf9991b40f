//! A FinOps FOCUS 1.2 (FinOps Open Cost and Usage Specification) cost and usage dataset as CSV:
//! one row per charge (a cloud's use of one SKU in one hour), checked by the FinOps Foundation's
//! own validator (`focus-validator` 2.2.1, rule model 1.2.0.1) in
//! `focus_export_passes_the_focus_validator`.
//!
//! This module stands alone: it depends on nothing else in the crate, and the caller (the usage
//! pricing) fills [`Charge`] and [`Export`].
//!
//! # What atoll claims to support
//!
//! FOCUS makes many columns conditional on "applicability criteria" a provider declares. An atoll
//! control plane is a provider that:
//!
//! - has sub accounts (`SUB_ACCOUNT_SUPPORTED`): every cloud is one (SubAccountId, SubAccountName);
//! - measures usage (`USAGE_MEASUREMENT_SUPPORTED`): ConsumedQuantity, ConsumedUnit;
//! - publishes unit prices (`PUBLIC_PRICE_LIST_SUPPORTED`, `UNIT_PRICING_SUPPORTED`): the
//!   operator's price file; ListUnitPrice, SkuId, SkuPriceId, SkuMeter, SkuPriceDetails;
//! - names its billing account (`ACCOUNT_NAMING_SUPPORTED`): BillingAccountName is never null;
//! - may run in a region (`REGION_SUPPORTED`): RegionId, RegionName (null without one).
//!
//! It has no commitment discounts, capacity reservations, negotiated prices, tags, availability
//! zones, virtual currencies, second pricing currency, or sub-account and billing-account types.
//! Its rows are per cloud × SKU × hour, not per resource, so the Resource columns (ResourceId,
//! ResourceName, ResourceType; required when a provider bills "provisioned resources" per
//! resource) are not written: a row is related to no single resource.
//!
//! # Columns and values
//!
//! Every column ([`COLUMNS`]) is written on every row, in alphabetical order; there are no
//! custom (`x_`) columns. An empty field is null.
//!
//! | column | value |
//! | --- | --- |
//! | BilledCost, ContractedCost, EffectiveCost, ListCost, PricingCurrencyEffectiveCost | `cost_nanos` as an exact decimal (below) |
//! | BillingAccountId / BillingAccountName | [`Export::billing_account_id`] / `billing_account_name` (the id when the name is empty) |
//! | BillingCurrency, PricingCurrency | [`Export::currency`], trimmed and upper-cased (ISO 4217) |
//! | BillingPeriodStart / BillingPeriodEnd | the export's period, inclusive start and exclusive end |
//! | ChargeCategory | `Usage` |
//! | ChargeClass | null: no row is a correction of an invoiced period |
//! | ChargeDescription | [`Charge::description`] (null when empty) |
//! | ChargeFrequency | `Usage-Based` |
//! | ChargePeriodStart / ChargePeriodEnd | `hour_start_unix` aligned down to the hour / one hour later |
//! | CommitmentDiscountId, CommitmentDiscountStatus | null: no commitment discounts (see below) |
//! | ConsumedQuantity / ConsumedUnit | [`Charge::consumed_quantity`] / `consumed_unit` |
//! | ContractedUnitPrice, ListUnitPrice, PricingCurrencyContractedUnitPrice, PricingCurrencyListUnitPrice | [`Charge::unit_price`] (no negotiated prices: the contracted price is the list price) |
//! | InvoiceId | null: the export is not an invoice |
//! | InvoiceIssuerName, ProviderName, PublisherName | [`Export::provider`] |
//! | PricingCategory | `Standard` |
//! | PricingQuantity / PricingUnit | [`Charge::pricing_quantity`] / `pricing_unit` |
//! | RegionId, RegionName | [`Export::region`] (both the same; null without one) |
//! | ServiceCategory / ServiceSubcategory / ServiceName | from [`Category`]: `Compute` / `Virtual Machines` / `MicroVMs`, `Storage` / `Block Storage` / `Volumes`, `Networking` / `Network Connectivity` / `Network` |
//! | SkuId, SkuMeter | [`Charge::sku`] (atoll's SKU names are its meter names) |
//! | SkuPriceId | `<sku>:<unit price>`: a price has no id in the price file, so the SKU and its price name it; a price change is a new SkuPriceId with one parent SkuId, as FOCUS requires |
//! | SkuPriceDetails | null (allowed when SkuPriceId is not null) |
//! | SubAccountId / SubAccountName | [`Charge::cloud_id`] / `cloud_name` (the id when the name is empty; both null when the id is empty) |
//!
//! Costs: atoll has no discounts, commitments or negotiated prices, so the four costs are equal
//! (FOCUS: ContractedCost and EffectiveCost equal BilledCost for a charge that no discount or
//! commitment touches; ListCost is the cost at list price). They are written from the integer
//! nanos as a decimal string (`1_500_000_000` → `1.5`), so no float rounding touches them.
//!
//! Quantities and unit prices are `f64`s: written in Rust's shortest round-trip form, never in
//! exponent notation, always with a decimal point (a column of whole numbers would otherwise be
//! read as integers, which the validator's Decimal type check rejects). A negative, NaN or infinite
//! value (metering never produces one) is written as `0.0` rather than as something no reader
//! can parse or that starts with `-`.
//!
//! FOCUS requires ListUnitPrice × PricingQuantity = ListCost (the validator allows a relative
//! 10⁻⁹, at least 10⁻⁹ of the currency). The caller computes `cost_nanos` from the same quantity
//! and price, rounded to the nano; that is within the tolerance.
//!
//! Units (FOCUS Unit Format): simple units are plural (`GB`), compound units are
//! `<unit>-<plural time unit>` (`GiB-Hours`). See [`units`] for the values atoll uses; every one
//! passes the validator's unit format check.
//!
//! Date/times are `YYYY-MM-DDTHH:MM:SSZ` in UTC, as FOCUS requires.
//!
//! # CSV
//!
//! RFC 4180: CRLF after every record (the header too); a field holding a comma, quote, CR or LF
//! is quoted with its quotes doubled. Against CSV injection a text field that starts with `=`,
//! `+`, `-`, `@`, tab or CR gets a leading `'` so a spreadsheet never evaluates it. Only text
//! that comes from outside (names, ids, descriptions, units, SKUs) can start so, and such a
//! value then reads back with the `'` (FOCUS asks for strings unchanged; a spreadsheet running
//! a cloud's name as a formula is worse). Numbers and date/times are written here, never
//! negative, and never touched by the defence.
//!
//! # Validator findings (focus-validator 2.2.1)
//!
//! What the validator gets wrong, and what this module and its test do about it:
//!
//! - It ORs a rule's applicability criteria (a rule applies when ANY of them is claimed), so
//!   claiming a public price list makes it require the PricingCurrency* columns, which FOCUS
//!   requires only with virtual currencies. They are written (FOCUS allows them "in all other
//!   cases") with the billing currency's values, which is what they are.
//! - Its ConsumedQuantity rules read CommitmentDiscountStatus and fail when that column is
//!   missing, so CommitmentDiscountId and CommitmentDiscountStatus are written, null.
//! - Its InvoiceId nullability is an OR of "always null" and "never null" (the spec's
//!   conditions are lost), so one branch fails whatever the data while the OR passes: the test
//!   accepts exactly that failure (InvoiceId-C-005-C) and requires the OR to pass.
//! - It reads "ChargeClass is not Correction" as `ChargeClass IS NOT NULL AND ChargeClass <>
//!   'Correction'`, so on rows whose ChargeClass is null (every row here) it never checks
//!   ListUnitPrice × PricingQuantity = ListCost nor the columns that must not be null for usage.
//!   The test runs it a second time on a probe copy whose ChargeClass is another value, which
//!   brings those checks to life.
//! - It infers CSV column types and checks strings for ASCII only: a column whose every value
//!   looks like a number (clouds named "1" and "2") is read as integers and fails the String
//!   type check, and a non-ASCII name fails its string format check although FOCUS allows any
//!   Unicode. Neither is worked around here: the values are the user's.
//! - It exits 0 whatever it finds, opens its currency list relative to the working directory,
//!   writes a log file there, and skips the dataset-level verdicts: the test runs it in a
//!   directory of its own and reads the verdict of every rule.

use std::fmt::Write as _;

/// The measurement units atoll's charges use (FOCUS Unit Format).
pub mod units {
    /// vCPU time: a count unit ("vCPU", not among FOCUS's recommended count units, which it
    /// allows) over hours.
    pub const VCPU_HOURS: &str = "vCPU-Hours";
    /// Memory held over time (2^30 bytes for an hour).
    pub const GIB_HOURS: &str = "GiB-Hours";
    /// Provisioned volume size over time, priced per month (10^9 bytes for a month); the
    /// hours in a month are the pricing's convention (with 730, an hour of a 10 GB volume is
    /// 10/730 GB-Months).
    pub const GB_MONTHS: &str = "GB-Months";
    /// Data transferred (10^9 bytes).
    pub const GB: &str = "GB";
}

/// What a charge is for: FOCUS's ServiceCategory, ServiceSubcategory and ServiceName.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    /// MicroVMs: vCPU and memory.
    Compute,
    /// Volumes.
    Storage,
    /// Guest traffic.
    Network,
}

impl Category {
    /// FOCUS ServiceCategory (one of its allowed values).
    pub fn service_category(self) -> &'static str {
        match self {
            Category::Compute => "Compute",
            Category::Storage => "Storage",
            Category::Network => "Networking",
        }
    }

    /// FOCUS ServiceSubcategory (an allowed value whose parent is [`Self::service_category`]).
    pub fn service_subcategory(self) -> &'static str {
        match self {
            Category::Compute => "Virtual Machines",
            Category::Storage => "Block Storage",
            Category::Network => "Network Connectivity",
        }
    }

    /// FOCUS ServiceName: the offering (one ServiceCategory each, as FOCUS requires).
    pub fn service_name(self) -> &'static str {
        match self {
            Category::Compute => "MicroVMs",
            Category::Storage => "Volumes",
            Category::Network => "Network",
        }
    }
}

/// One charge: a cloud's use of one SKU in one hour.
#[derive(Clone, Debug, PartialEq)]
pub struct Charge {
    /// The API's cloud id, e.g. `c0000002a`: SubAccountId.
    pub cloud_id: String,
    /// SubAccountName (the id when empty).
    pub cloud_name: String,
    /// The charge period's start in seconds since the epoch; aligned down to the hour when it
    /// is not. The period is one hour long.
    pub hour_start_unix: u64,
    /// SkuId and SkuMeter, e.g. `compute-vcpu`, `storage-volume`, `network-from_guest-external`.
    pub sku: String,
    /// ServiceCategory, ServiceSubcategory and ServiceName.
    pub category: Category,
    /// ChargeDescription.
    pub description: String,
    /// PricingQuantity, in `pricing_unit`.
    pub pricing_quantity: f64,
    /// PricingUnit (see [`units`]).
    pub pricing_unit: String,
    /// ConsumedQuantity, in `consumed_unit`.
    pub consumed_quantity: f64,
    /// ConsumedUnit (see [`units`]).
    pub consumed_unit: String,
    /// The list price of one pricing unit, in the billing currency.
    pub unit_price: f64,
    /// The cost in 10^-9 of the currency.
    pub cost_nanos: u64,
}

/// The export's constants: who bills whom, in what currency, for which period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Export<'a> {
    /// ProviderName, PublisherName and InvoiceIssuerName, e.g. `atoll`.
    pub provider: &'a str,
    /// BillingAccountId: the operator's billing account (e.g. the control plane's name).
    pub billing_account_id: &'a str,
    /// BillingAccountName (the id when empty).
    pub billing_account_name: &'a str,
    /// BillingCurrency and PricingCurrency: an ISO 4217 code (upper-cased when written).
    pub currency: &'a str,
    /// BillingPeriodStart (inclusive), seconds since the epoch.
    pub billing_period_start_unix: u64,
    /// BillingPeriodEnd (exclusive), seconds since the epoch.
    pub billing_period_end_unix: u64,
    /// RegionId and RegionName; null when `None`.
    pub region: Option<&'a str>,
}

/// The header, in order: every column [`csv`] writes.
pub const COLUMNS: &[&str] = &[
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "CommitmentDiscountId",
    "CommitmentDiscountStatus",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "InvoiceId",
    "InvoiceIssuerName",
    "ListCost",
    "ListUnitPrice",
    "PricingCategory",
    "PricingCurrency",
    "PricingCurrencyContractedUnitPrice",
    "PricingCurrencyEffectiveCost",
    "PricingCurrencyListUnitPrice",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "RegionId",
    "RegionName",
    "ServiceCategory",
    "ServiceName",
    "ServiceSubcategory",
    "SkuId",
    "SkuMeter",
    "SkuPriceDetails",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
];

const HOUR: u64 = 3600;

/// The FOCUS 1.2 CSV of `charges`: the header and one row per charge.
pub fn csv(export: &Export, charges: &[Charge]) -> String {
    let mut out = String::new();
    push_record(&mut out, COLUMNS.iter().map(|c| Field::Text(c)));

    let currency = export.currency.trim().to_ascii_uppercase();
    let account_name = or_else(export.billing_account_name, export.billing_account_id);
    let period_start = datetime(export.billing_period_start_unix);
    let period_end = datetime(export.billing_period_end_unix);
    let region = export.region.unwrap_or("");

    for c in charges {
        let start = hour_start(c.hour_start_unix);
        let cost = decimal_from_nanos(c.cost_nanos);
        let unit_price = decimal(c.unit_price);
        let (cloud_id, cloud_name) = if c.cloud_id.is_empty() {
            ("", "")
        } else {
            (c.cloud_id.as_str(), or_else(&c.cloud_name, &c.cloud_id))
        };
        // Null with the SkuId, so that it never lacks its one parent SkuId.
        let sku_price_id = if c.sku.is_empty() {
            String::new()
        } else {
            format!("{}:{unit_price}", c.sku)
        };
        let (charge_start, charge_end) = (datetime(start), datetime(start.saturating_add(HOUR)));
        let (consumed, pricing) = (decimal(c.consumed_quantity), decimal(c.pricing_quantity));
        let row: [Field; 43] = [
            Field::Number(&cost),                          // BilledCost
            Field::Text(export.billing_account_id),        // BillingAccountId
            Field::Text(account_name),                     // BillingAccountName
            Field::Text(&currency),                        // BillingCurrency
            Field::Number(&period_end),                    // BillingPeriodEnd
            Field::Number(&period_start),                  // BillingPeriodStart
            Field::Text("Usage"),                          // ChargeCategory
            Field::Null,                                   // ChargeClass
            Field::Text(&c.description),                   // ChargeDescription
            Field::Text("Usage-Based"),                    // ChargeFrequency
            Field::Number(&charge_end),                    // ChargePeriodEnd
            Field::Number(&charge_start),                  // ChargePeriodStart
            Field::Null,                                   // CommitmentDiscountId
            Field::Null,                                   // CommitmentDiscountStatus
            Field::Number(&consumed),                      // ConsumedQuantity
            Field::Text(&c.consumed_unit),                 // ConsumedUnit
            Field::Number(&cost),                          // ContractedCost
            Field::Number(&unit_price),                    // ContractedUnitPrice
            Field::Number(&cost),                          // EffectiveCost
            Field::Null,                                   // InvoiceId
            Field::Text(export.provider),                  // InvoiceIssuerName
            Field::Number(&cost),                          // ListCost
            Field::Number(&unit_price),                    // ListUnitPrice
            Field::Text("Standard"),                       // PricingCategory
            Field::Text(&currency),                        // PricingCurrency
            Field::Number(&unit_price),                    // PricingCurrencyContractedUnitPrice
            Field::Number(&cost),                          // PricingCurrencyEffectiveCost
            Field::Number(&unit_price),                    // PricingCurrencyListUnitPrice
            Field::Number(&pricing),                       // PricingQuantity
            Field::Text(&c.pricing_unit),                  // PricingUnit
            Field::Text(export.provider),                  // ProviderName
            Field::Text(export.provider),                  // PublisherName
            Field::Text(region),                           // RegionId
            Field::Text(region),                           // RegionName
            Field::Text(c.category.service_category()),    // ServiceCategory
            Field::Text(c.category.service_name()),        // ServiceName
            Field::Text(c.category.service_subcategory()), // ServiceSubcategory
            Field::Text(&c.sku),                           // SkuId
            Field::Text(&c.sku),                           // SkuMeter
            Field::Null,                                   // SkuPriceDetails
            Field::Text(&sku_price_id),                    // SkuPriceId
            Field::Text(cloud_id),                         // SubAccountId
            Field::Text(cloud_name),                       // SubAccountName
        ];
        push_record(&mut out, row.into_iter());
    }
    out
}

/// One CSV field: text from outside (quoted and defended), a number or date/time written here
/// (never needs either), or null (empty).
#[derive(Clone, Copy)]
enum Field<'a> {
    Text(&'a str),
    Number(&'a str),
    Null,
}

fn push_record<'a>(out: &mut String, fields: impl Iterator<Item = Field<'a>>) {
    for (i, f) in fields.enumerate() {
        if i > 0 {
            out.push(',');
        }
        match f {
            Field::Text(t) => push_text(out, t),
            Field::Number(n) => out.push_str(n),
            Field::Null => {}
        }
    }
    out.push_str("\r\n");
}

/// A text field per RFC 4180, never read as a formula by a spreadsheet.
fn push_text(out: &mut String, t: &str) {
    let defended = t.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let quoted = t.contains([',', '"', '\r', '\n']);
    if quoted {
        out.push('"');
    }
    if defended {
        out.push('\'');
    }
    if quoted {
        out.push_str(&t.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(t);
    }
}

fn or_else<'a>(value: &'a str, fallback: &'a str) -> &'a str {
    if value.is_empty() {
        fallback
    } else {
        value
    }
}

/// The start of the hour holding `unix`.
pub fn hour_start(unix: u64) -> u64 {
    unix - unix % HOUR
}

/// `nanos` 10^-9 units as an exact decimal with at least one fractional digit:
/// `1_500_000_000` → `1.5`, `1` → `0.000000001`, `0` → `0.0`.
pub fn decimal_from_nanos(nanos: u64) -> String {
    let mut s = format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000);
    while s.ends_with('0') && !s.ends_with(".0") {
        s.pop();
    }
    s
}

/// A non-negative finite `f64` in its shortest round-trip decimal form (never exponent
/// notation), with at least one fractional digit; anything else as `0.0`.
pub fn decimal(v: f64) -> String {
    if !v.is_finite() || v <= 0.0 {
        return "0.0".into();
    }
    let mut s = v.to_string();
    if !s.contains('.') {
        s.push_str(".0");
    }
    s
}

/// `unix` seconds as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn datetime(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    let (year, month, day) = atoll_api::usage::civil_date(days);
    let mut s = String::with_capacity(20);
    let _ = write!(
        s,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
    s
}

/// Running the FinOps Foundation's `focus-validator` (installed in a venv by `cargo xtask
/// setup`) on an export: for this module's tests and the end-to-end spend test.
pub mod validator {
    use std::{collections::BTreeMap, path::Path, process::Command};

    /// The applicability criteria atoll claims (module docs).
    pub const CRITERIA: &str = "ACCOUNT_NAMING_SUPPORTED,PUBLIC_PRICE_LIST_SUPPORTED,\
REGION_SUPPORTED,SUB_ACCOUNT_SUPPORTED,UNIT_PRICING_SUPPORTED,USAGE_MEASUREMENT_SUPPORTED";

    /// What the validator reports failed whatever the data (module docs).
    pub const DEFECTS: &[&str] = &["InvoiceId-C-005-C"];

    /// Runs the validator of `venv` on `csv` for FOCUS 1.2 with [`CRITERIA`], in `workdir` (an
    /// empty directory: it reads its rules relative to its working directory and writes its
    /// log there). Returns every rule's verdict (`PASS`, `FAIL` or `SKIPPED`) and the report.
    pub fn run(
        venv: &Path,
        csv: &str,
        workdir: &Path,
    ) -> Result<(BTreeMap<String, String>, String), String> {
        let validator = venv.join("bin/focus-validator");
        let out = Command::new(venv.join("bin/python"))
            .args([
                "-c",
                "import focus_validator, os; print(os.path.dirname(focus_validator.__file__))",
            ])
            .output()
            .map_err(|e| format!("running {}/bin/python: {e}", venv.display()))?;
        if !out.status.success() {
            return Err(format!(
                "focus_validator does not import: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let package = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        std::os::unix::fs::symlink(&package, workdir.join("focus_validator"))
            .map_err(|e| format!("linking the validator's package: {e}"))?;
        std::fs::write(workdir.join("focus.csv"), csv)
            .map_err(|e| format!("writing the export: {e}"))?;
        let out = Command::new(&validator)
            .current_dir(workdir)
            .args(["--data-file", "focus.csv", "--validate-version", "1.2"])
            .args(["--block-download", "--applicability-criteria", CRITERIA])
            .output()
            .map_err(|e| format!("running {}: {e}", validator.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // It exits 0 whatever it finds (and 1 with a traceback when it breaks).
        if !out.status.success() {
            return Err(format!("focus-validator broke:\n{stdout}\n{stderr}"));
        }
        // Lines are `<icon> <RuleId>: PASS|FAIL|SKIPPED  (details)`.
        let mut verdicts = BTreeMap::new();
        for line in stdout.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let [_, id, verdict, ..] = words[..] {
                if let (Some(id), "PASS" | "FAIL" | "SKIPPED") = (id.strip_suffix(':'), verdict) {
                    verdicts.insert(id.to_string(), verdict.to_string());
                }
            }
        }
        if verdicts.len() <= 500 {
            return Err(format!("no verdicts in:\n{stdout}\n{stderr}"));
        }
        Ok((verdicts, stdout))
    }

    /// The rules that failed, but `allowed`.
    pub fn failed<'a>(verdicts: &'a BTreeMap<String, String>, allowed: &[&str]) -> Vec<&'a str> {
        verdicts
            .iter()
            .filter(|(id, v)| *v == "FAIL" && !allowed.contains(&id.as_str()))
            .map(|(id, _)| id.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, BTreeSet},
        path::{Path, PathBuf},
        process::Command,
    };

    use super::*;

    /// The columns FOCUS 1.2 requires in every dataset: the unconditional presence rules
    /// (`CostAndUsage-D-0xx-M`) of focus-validator 2.2.1's model 1.2.0.1.
    const MANDATORY: &[&str] = &[
        "BilledCost",
        "BillingAccountId",
        "BillingAccountName",
        "BillingCurrency",
        "BillingPeriodEnd",
        "BillingPeriodStart",
        "ChargeCategory",
        "ChargeClass",
        "ChargeDescription",
        "ChargePeriodEnd",
        "ChargePeriodStart",
        "ContractedCost",
        "EffectiveCost",
        "InvoiceIssuerName",
        "ListCost",
        "PricingQuantity",
        "PricingUnit",
        "ProviderName",
        "PublisherName",
        "ServiceCategory",
        "ServiceName",
    ];

    /// The columns its presence rules require for the criteria atoll claims
    /// ([`CRITERIA`]), and the RECOMMENDED ones (ChargeFrequency, InvoiceId,
    /// ServiceSubcategory).
    const CONDITIONAL: &[&str] = &[
        "ChargeFrequency",
        "ConsumedQuantity",
        "ConsumedUnit",
        "InvoiceId",
        "ListUnitPrice",
        "RegionId",
        "RegionName",
        "ServiceSubcategory",
        "SkuId",
        "SkuMeter",
        "SkuPriceDetails",
        "SkuPriceId",
        "SubAccountId",
        "SubAccountName",
    ];

    use validator::{CRITERIA, DEFECTS as VALIDATOR_DEFECTS};

    fn export() -> Export<'static> {
        Export {
            provider: "atoll",
            billing_account_id: "ctl-eu1",
            billing_account_name: "atoll control plane eu1",
            currency: "USD",
            billing_period_start_unix: 1_767_225_600, // 2026-01-01T00:00:00Z
            billing_period_end_unix: 1_769_904_000,   // 2026-02-01T00:00:00Z
            region: Some("eu1"),
        }
    }

    fn charge(
        cloud: (&str, &str),
        hour: u64,
        sku: &str,
        category: Category,
        quantity: f64,
        unit: &str,
        unit_price: f64,
    ) -> Charge {
        Charge {
            cloud_id: cloud.0.into(),
            cloud_name: cloud.1.into(),
            hour_start_unix: hour,
            sku: sku.into(),
            category,
            description: format!("{sku} usage"),
            pricing_quantity: quantity,
            pricing_unit: unit.into(),
            consumed_quantity: quantity,
            consumed_unit: unit.into(),
            unit_price,
            // As the pricing does: the product, rounded once to the nano.
            cost_nanos: (quantity * unit_price * 1e9).round() as u64,
        }
    }

    /// Splits CSV text into records of fields (RFC 4180, CRLF records).
    fn parse(csv: &str) -> Vec<Vec<String>> {
        let mut records = vec![];
        let mut record = vec![];
        let mut field = String::new();
        let mut quoted = false;
        let mut chars = csv.chars().peekable();
        while let Some(c) = chars.next() {
            match (quoted, c) {
                (true, '"') if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                (true, '"') => quoted = false,
                (true, c) => field.push(c),
                (false, '"') => quoted = true,
                (false, ',') => record.push(std::mem::take(&mut field)),
                (false, '\r') if chars.peek() == Some(&'\n') => {
                    chars.next();
                    record.push(std::mem::take(&mut field));
                    records.push(std::mem::take(&mut record));
                }
                (false, c) => field.push(c),
            }
        }
        assert!(field.is_empty() && record.is_empty(), "unterminated record");
        records
    }

    fn column<'a>(records: &'a [Vec<String>], row: usize, name: &str) -> &'a str {
        let i = COLUMNS.iter().position(|c| *c == name).unwrap();
        &records[row][i]
    }

    #[test]
    fn focus_header_has_every_required_column_once() {
        let out = csv(&export(), &[]);
        let header = out.strip_suffix("\r\n").unwrap();
        let names: Vec<&str> = header.split(',').collect();
        assert_eq!(names, COLUMNS);
        let unique: BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(unique.len(), names.len(), "a column twice");
        for c in MANDATORY.iter().chain(CONDITIONAL) {
            assert!(unique.contains(c), "{c} missing");
        }
        // FOCUS columns are PascalCase alphanumerics; custom ones would need `x_`.
        assert!(names
            .iter()
            .all(|n| n.chars().all(|c| c.is_ascii_alphanumeric())
                && n.starts_with(|c: char| c.is_ascii_uppercase())));
    }

    #[test]
    fn focus_rows_fill_every_column() {
        let c = charge(
            ("c0000002a", "web"),
            1_767_229_200,
            "compute-vcpu",
            Category::Compute,
            0.0123,
            units::VCPU_HOURS,
            0.04,
        );
        let records = parse(&csv(&export(), std::slice::from_ref(&c)));
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].len(), COLUMNS.len());
        let col = |n| column(&records, 1, n);
        for cost in ["BilledCost", "ContractedCost", "EffectiveCost", "ListCost"] {
            assert_eq!(col(cost), "0.000492", "{cost}");
        }
        assert_eq!(col("ListUnitPrice"), "0.04");
        assert_eq!(col("PricingQuantity"), "0.0123");
        assert_eq!(col("PricingUnit"), "vCPU-Hours");
        assert_eq!(col("ChargePeriodStart"), "2026-01-01T01:00:00Z");
        assert_eq!(col("ChargePeriodEnd"), "2026-01-01T02:00:00Z");
        assert_eq!(col("BillingPeriodStart"), "2026-01-01T00:00:00Z");
        assert_eq!(col("BillingPeriodEnd"), "2026-02-01T00:00:00Z");
        assert_eq!(col("ChargeCategory"), "Usage");
        assert_eq!(col("ChargeClass"), "");
        assert_eq!(col("ServiceCategory"), "Compute");
        assert_eq!(col("ServiceSubcategory"), "Virtual Machines");
        assert_eq!(col("SkuPriceId"), "compute-vcpu:0.04");
        assert_eq!(col("SubAccountId"), "c0000002a");
        assert_eq!(col("SubAccountName"), "web");
        assert_eq!(col("RegionId"), "eu1");
        assert_eq!(col("InvoiceId"), "");

        // Fallbacks: an empty name is the id; no region is null; the currency is normalised.
        let mut nameless = c.clone();
        nameless.cloud_name.clear();
        let e = Export {
            region: None,
            currency: " usd ",
            billing_account_name: "",
            ..export()
        };
        let records = parse(&csv(&e, &[nameless]));
        let col = |n| column(&records, 1, n);
        assert_eq!(col("SubAccountName"), "c0000002a");
        assert_eq!(col("BillingAccountName"), "ctl-eu1");
        assert_eq!(col("RegionId"), "");
        assert_eq!(col("RegionName"), "");
        assert_eq!(col("BillingCurrency"), "USD");
    }

    #[test]
    fn focus_csv_quotes_and_defends_text() {
        let mut out = String::new();
        for t in [
            "plain",
            "a, b",
            "say \"hi\"",
            "two\nlines",
            "cr\rhere",
            "=1+1",
            "+1",
            "-1",
            "@SUM(A1)",
            "\tx",
            "\rx",
            "=HYPERLINK(\"x\",\"y\")",
            "",
        ] {
            push_text(&mut out, t);
            out.push('|');
        }
        assert_eq!(
            out,
            "plain|\"a, b\"|\"say \"\"hi\"\"\"|\"two\nlines\"|\"cr\rhere\"|'=1+1|'+1|'-1|\
'@SUM(A1)|'\tx|\"'\rx\"|\"'=HYPERLINK(\"\"x\"\",\"\"y\"\")\"||"
        );

        // Through the writer: the fields read back as written, the defended ones with a `'`.
        let mut c = charge(
            ("c1", "Quote \"q\", comma"),
            0,
            "-sku",
            Category::Network,
            1.0,
            units::GB,
            0.5,
        );
        c.description = "=cmd|' /C calc'!A0".into();
        let records = parse(&csv(&export(), &[c]));
        assert_eq!(column(&records, 1, "SubAccountName"), "Quote \"q\", comma");
        assert_eq!(
            column(&records, 1, "ChargeDescription"),
            "'=cmd|' /C calc'!A0"
        );
        assert_eq!(column(&records, 1, "SkuId"), "'-sku");
        // Numbers are never defended (never negative).
        assert_eq!(column(&records, 1, "ListCost"), "0.5");
    }

    #[test]
    fn focus_costs_are_exact_decimals_from_nanos() {
        assert_eq!(decimal_from_nanos(0), "0.0");
        assert_eq!(decimal_from_nanos(1), "0.000000001");
        assert_eq!(decimal_from_nanos(10), "0.00000001");
        assert_eq!(decimal_from_nanos(492_000), "0.000492");
        assert_eq!(decimal_from_nanos(1_000_000_000), "1.0");
        assert_eq!(decimal_from_nanos(1_500_000_000), "1.5");
        assert_eq!(decimal_from_nanos(123_456_789_012), "123.456789012");
        // Past f64's 53 bits, still exact.
        assert_eq!(decimal_from_nanos(u64::MAX), "18446744073.709551615");
        assert_eq!(
            decimal_from_nanos(9_007_199_254_740_993),
            "9007199.254740993"
        );

        assert_eq!(decimal(0.0123), "0.0123");
        assert_eq!(decimal(3.0), "3.0");
        assert_eq!(decimal(1e-7), "0.0000001");
        assert_eq!(decimal(1e21), "1000000000000000000000.0");
        assert_eq!(decimal(0.1 + 0.2), "0.30000000000000004");
        for bad in [0.0, -0.0, -1.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(decimal(bad), "0.0", "{bad}");
        }
        // Every number matches FOCUS's numeric format and has a decimal point.
        for s in [decimal(5e-324), decimal(f64::MAX), decimal_from_nanos(7)] {
            assert!(s.contains('.') && s.chars().all(|c| c.is_ascii_digit() || c == '.'));
            assert_eq!(s.matches('.').count(), 1);
        }
    }

    #[test]
    fn focus_hours_are_aligned_and_dates_utc() {
        assert_eq!(hour_start(0), 0);
        assert_eq!(hour_start(3599), 0);
        assert_eq!(hour_start(3600), 3600);
        assert_eq!(hour_start(1_767_229_201), 1_767_229_200);
        assert_eq!(datetime(0), "1970-01-01T00:00:00Z");
        assert_eq!(datetime(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(datetime(1_767_225_599), "2025-12-31T23:59:59Z");
        assert_eq!(datetime(1_767_225_600), "2026-01-01T00:00:00Z");
        assert_eq!(datetime(4_107_542_400), "2100-03-01T00:00:00Z");
        assert_eq!(datetime(253_402_300_799), "9999-12-31T23:59:59Z");
        // Never panics, even past year 9999.
        assert!(datetime(u64::MAX).ends_with('Z'));

        let mut c = charge(
            ("c1", "a"),
            1_767_229_200 + 1799,
            "s",
            Category::Storage,
            1.0,
            "GB",
            1.0,
        );
        let records = parse(&csv(&export(), std::slice::from_ref(&c)));
        assert_eq!(
            column(&records, 1, "ChargePeriodStart"),
            "2026-01-01T01:00:00Z"
        );
        assert_eq!(
            column(&records, 1, "ChargePeriodEnd"),
            "2026-01-01T02:00:00Z"
        );
        c.hour_start_unix = u64::MAX;
        let records = parse(&csv(&export(), &[c]));
        assert_eq!(records.len(), 2);
    }

    /// The sample export: all three categories, two clouds (one named with a comma and a
    /// quote), tiny and zero quantities, a price that is 0, over several hours.
    fn sample() -> Vec<Charge> {
        let a = ("c0000002a", "web, \"prod\"");
        let b = ("c0000002b", "batch");
        let h = 1_767_229_200; // 2026-01-01T01:00:00Z
        let mut charges = vec![
            charge(
                a,
                h,
                "compute-vcpu",
                Category::Compute,
                0.0123,
                units::VCPU_HOURS,
                0.04,
            ),
            charge(
                a,
                h,
                "compute-memory",
                Category::Compute,
                0.5,
                units::GIB_HOURS,
                0.005,
            ),
            charge(
                a,
                h,
                "storage-volume",
                Category::Storage,
                10.0 / 730.0,
                units::GB_MONTHS,
                0.08,
            ),
            charge(
                a,
                h,
                "network-from_guest-external",
                Category::Network,
                0.000_000_001,
                units::GB,
                0.09,
            ),
            charge(
                b,
                h + 3600,
                "compute-vcpu",
                Category::Compute,
                2.0,
                units::VCPU_HOURS,
                0.04,
            ),
            charge(
                b,
                h + 3600,
                "compute-memory",
                Category::Compute,
                0.0,
                units::GIB_HOURS,
                0.005,
            ),
            charge(
                b,
                h + 7200,
                "storage-volume",
                Category::Storage,
                0.0,
                units::GB_MONTHS,
                0.08,
            ),
            charge(
                b,
                h + 7200,
                "network-to_guest-external",
                Category::Network,
                1.25,
                units::GB,
                0.0,
            ),
            charge(
                b,
                h + 7200,
                "compute-vcpu",
                Category::Compute,
                1e-12,
                units::VCPU_HOURS,
                0.04,
            ),
        ];
        // Usage measured in a unit other than the price's.
        charges[3].consumed_quantity = 1.0;
        charges[3].consumed_unit = "B".into();
        charges[1].description = "=memory, \"held\"".into();
        charges
    }

    /// The venv `cargo xtask setup` installs focus-validator into (it fails loudly without).
    fn venv() -> PathBuf {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/focus-venv");
        let validator = venv.join("bin/focus-validator");
        assert!(
            validator.exists(),
            "{} is missing: run `cargo xtask setup` (cargo xtask test does), which installs \
             the FinOps Foundation's focus-validator into target/focus-venv",
            validator.display()
        );
        venv
    }

    /// The header against the validator's own rule model: [`MANDATORY`] is exactly its
    /// unconditional MUST-presence columns, and every column it requires for [`CRITERIA`] is
    /// written.
    #[test]
    fn focus_columns_cover_the_validators_presence_rules() {
        let script = "import json, os, sys, focus_validator\n\
            path = os.path.join(os.path.dirname(focus_validator.__file__), 'rules', 'model-1.2.0.1.json')\n\
            claimed = set(sys.argv[1].split(','))\n\
            for r in json.load(open(path))['ModelRules'].values():\n\
            \x20   v = r['ValidationCriteria']\n\
            \x20   if r['Function'] == 'Presence' and r['EntityType'] == 'Dataset' and v['Keyword'] == 'MUST':\n\
            \x20       c = r['ApplicabilityCriteria']\n\
            \x20       print('M' if not c else 'C' if set(c) <= claimed else '-', r['Reference'])\n";
        let out = Command::new(venv().join("bin/python"))
            .args(["-c", script, CRITERIA])
            .output()
            .expect("run the venv's python");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut mandatory = BTreeSet::new();
        let mut required = BTreeSet::new();
        for line in stdout.lines() {
            match line.split_once(' ') {
                Some(("M", column)) => {
                    mandatory.insert(column);
                    required.insert(column);
                }
                Some(("C", column)) => {
                    required.insert(column);
                }
                _ => {}
            }
        }
        assert_eq!(mandatory, MANDATORY.iter().copied().collect());
        let written: BTreeSet<&str> = COLUMNS.iter().copied().collect();
        let missing: Vec<&&str> = required.difference(&written).collect();
        assert!(missing.is_empty(), "required and not written: {missing:?}");
        assert!(required.len() > MANDATORY.len(), "{stdout}");
    }

    /// focus-validator (installed by `cargo xtask setup`) run on `csv` for FOCUS 1.2 with
    /// atoll's criteria: every rule's verdict (`PASS`, `FAIL` or `SKIPPED`) and the report.
    fn focus_validator(csv: &str) -> (BTreeMap<String, String>, String) {
        let dir = tempfile::tempdir().unwrap();
        validator::run(&venv(), csv, dir.path()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Asserts that only `allowed` rules failed and that every rule of `passed` passed (was
    /// checked, not skipped).
    fn assert_verdicts(
        (verdicts, report): &(BTreeMap<String, String>, String),
        allowed: &[&str],
        passed: &[&str],
        csv: &str,
    ) {
        let failed: Vec<&String> = verdicts
            .iter()
            .filter(|(id, v)| *v == "FAIL" && !allowed.contains(&id.as_str()))
            .map(|(id, _)| id)
            .collect();
        assert!(
            failed.is_empty(),
            "FOCUS 1.2 rules failed: {failed:?}\n{report}\n--- the CSV ---\n{csv}"
        );
        for rule in passed {
            assert_eq!(
                verdicts.get(*rule).map(String::as_str),
                Some("PASS"),
                "{rule} did not pass\n{report}"
            );
        }
    }

    /// CSV text from records (all fields as text: the writer's numbers never need quoting).
    fn unparse(records: &[Vec<String>]) -> String {
        let mut out = String::new();
        for r in records {
            push_record(&mut out, r.iter().map(|f| Field::Text(f.as_str())));
        }
        out
    }

    #[test]
    fn focus_export_passes_the_focus_validator() {
        let text = csv(&export(), &sample());
        let run = focus_validator(&text);
        assert_verdicts(
            &run,
            VALIDATOR_DEFECTS,
            &[
                "CostAndUsage-D-006-M",       // BilledCost present
                "BilledCost-C-002-M",         // numeric format
                "BillingCurrency-C-003-M",    // currency format
                "BillingCurrency-C-006-M",    // national currency
                "ChargeCategory-C-003-M",     // allowed value
                "ChargeClass-C-005-C",        // null or Correction
                "ChargeFrequency-C-003-M",    // allowed value
                "ChargePeriodStart-C-001-M",  // date/time type
                "ChargePeriodStart-C-002-M",  // date/time format
                "ConsumedUnit-C-006-C",       // not null with a quantity
                "InvoiceId-C-003-C",          // the OR of the nullability rules
                "ListUnitPrice-C-008-M",      // non-negative
                "PricingQuantity-C-001-M",    // decimal
                "PricingUnit-C-003-O",        // unit format
                "RegionName-C-005-C",         // with RegionId
                "ServiceName-C-005-C",        // one category per service
                "ServiceSubcategory-C-004-M", // subcategory's parent
                "SkuPriceId-C-008-M",         // one parent SkuId
                "SubAccountName-C-002-M",     // string format
                "SubAccountName-C-005-C",     // with SubAccountId
            ],
            &text,
        );

        // The validator reads FOCUS's "ChargeClass is not Correction" as `ChargeClass IS NOT
        // NULL AND ChargeClass <> 'Correction'`, so on rows whose ChargeClass is null (all of
        // ours) it never checks ListUnitPrice x PricingQuantity = ListCost or the columns that
        // must not be null for usage. A probe copy whose ChargeClass is some other value makes
        // it check them (and fail only the ChargeClass value itself).
        let mut records = parse(&text);
        let class = COLUMNS.iter().position(|c| *c == "ChargeClass").unwrap();
        for r in &mut records[1..] {
            r[class] = "Probe".into();
        }
        let probe = unparse(&records);
        let run = focus_validator(&probe);
        let allowed: Vec<&str> = [
            VALIDATOR_DEFECTS,
            &["ChargeClass-C-000-M", "ChargeClass-C-005-C"],
        ]
        .concat();
        assert_eq!(
            run.0.get("ChargeClass-C-005-C").map(String::as_str),
            Some("FAIL")
        );
        assert_verdicts(
            &run,
            &allowed,
            &[
                "ListCost-C-009-C",      // ListUnitPrice x PricingQuantity = ListCost
                "ListUnitPrice-C-010-C", // the same, from ListUnitPrice's side
                "ListUnitPrice-C-005-C", // not null for usage
                "PricingQuantity-C-005-C",
                "PricingCurrencyListUnitPrice-C-005-C",
                "SkuId-C-005-C",
                "SkuPriceId-C-005-C",
            ],
            &probe,
        );
    }
}
