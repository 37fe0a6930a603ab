use aeg_core::sas::*;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let xml = std::fs::read_to_string(&a[1]).unwrap();
    let key = parse_delegation_key(&xml).expect("key");
    let perm = match a[3].as_str() { "c" => Permission::Create, "cw" => Permission::CreateWrite, _ => Permission::Read };
    let sas = BlobSas { account: "devstoreaccount1", container: "uploads", blob: &a[2], permission: perm,
        start: &a[4], expiry: &a[5], ip: None, protocol: "https",
        content_disposition: if a.len() > 6 { Some(a[6].as_str()) } else { None }, content_type: None };
    println!("{}", query(&sas, &key).unwrap());
}
