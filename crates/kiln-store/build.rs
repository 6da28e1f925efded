fn main() {
    // New migration files must rebuild the crate: sqlx::migrate! embeds them.
    println!("cargo:rerun-if-changed=migrations");
}
